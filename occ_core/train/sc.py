"""Self-correction (SC): two attempts per prompt, trained by policy gradient against a frozen reference.

Per prompt (a Q1 row of ``DATA/sc.jsonl``) the policy samples ``sc_samples`` first answers at
``sc_temperature`` (at most ``sc_max_new_tokens`` tokens: "The object is X." is about 6). Each first
answer then gets a second attempt, also sampled, on the re-ask ``RECHECK_TEXT``:

- ``sc_reask="conversation"`` (default, SCoRe): Q1 with its image, the first answer, then the re-ask,
  so the second attempt sees what it may correct;
- ``sc_reask="rewrite"`` (upstream): the Q1 turn with its question replaced by the re-ask, alone.

Rewards: ``answer_reward`` (1.0 for an exact match, else the upstream Levenshtein similarity). Attempt 2's
reward gets the bonus ``sc_improvement_bonus * (r2 - r1)`` (upstream alpha 0.1). The loss is

    policy_gradient_loss(attempt 1, A1) + policy_gradient_loss(attempt 2, A2)
    + sc_kl_weight * (KL1 + KL2)

where A is the reward minus the leave-one-out mean of the other samples of the same prompt (the batch
mean with one sample), the policy gradient flows through the log-probabilities of the sampled tokens
only, and KL is the k3 estimate on the sampled tokens against a separate frozen copy of the init
checkpoint. ``sc_phases="two-phase"`` (default) follows the upstream schedule: for the first half of the
optimiser steps only attempt 2 is trained, with the KL on attempt 1 alone, so attempt 1 stays near the
reference while attempt 2 learns to correct it; then both as above (``"both"``: throughout).

The upstream code had three bugs this module does not repeat (method-spec section 5; a unit test
each): its "RL loss" scaled the mean log-softmax over the whole vocabulary, its KL compared the policy
with itself, and its loss weights were Adam's beta defaults.

Log-probabilities are those of the tempered policy the tokens were sampled from (logits / temperature),
and image tokens are never sampled (an answer holding one would ask for an image feature that the
prompt lacks). Sampling is seeded from (seed, optimiser step, micro-batch, process), inside a forked
RNG, so a run resumed from a checkpoint samples the same tokens as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer

from occ_core.cot import Q1_TEXT, RECHECK_TEXT, content_blocks
from occ_core.train.config import TrainConfig
from occ_core.train.data import TrainingData
from occ_core.train.predict import first_question, generate_answers, prompt_inputs, reference_answers

# SCTrainer's per-step metrics that are counts, summed over a logging window (the rest are means).
SUM_METRICS = ("fixed", "broken")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def answer_reward(truth: str, answer: str) -> float:
    """The upstream reward: 1.0 for an exact match after lower-casing and trimming, else
    round(0.001 + 0.999 * (1 - distance / longer length), 2)."""
    truth, answer = truth.lower().strip(), answer.lower().strip()
    if truth == answer:
        return 1.0
    return round(0.001 + 0.999 * (1 - levenshtein(truth, answer) / max(len(truth), len(answer))), 2)


def advantages(rewards: Any) -> Any:
    """Reward minus a baseline, per sample: the mean of the prompt's other samples (leave-one-out).

    Args:
        rewards: (prompts, samples) tensor.
    Returns:
        Same shape; with one sample per prompt the baseline is the batch mean.
    """
    prompts, samples = rewards.shape
    if samples == 1:
        return rewards - rewards.mean()
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (samples - 1)


def token_logprobs(logits: Any, tokens: Any) -> Any:
    """Log-probability of each token under its logits: (sequences, length, vocab) -> (sequences, length)."""
    import torch

    logits = logits.float()
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def policy_gradient_loss(logprobs: Any, mask: Any, advantage: Any) -> Any:
    """REINFORCE on the sampled tokens: -mean over sequences of advantage * sum of their log-probs.

    Args:
        logprobs: (sequences, length) log-probabilities of the sampled tokens.
        mask: (sequences, length) 1 on a sampled token, 0 after the answer ended.
        advantage: (sequences,) advantage of each sequence; it carries no gradient.
    """
    return -(advantage.detach() * (logprobs * mask).sum(dim=1)).mean()


def kl_to_reference(logprobs: Any, ref_logprobs: Any, mask: Any) -> Any:
    """k3 estimate of KL(policy || reference) on the sampled tokens, averaged over them (0 when equal)."""
    import torch

    delta = ref_logprobs.detach() - logprobs
    per_token = torch.exp(delta) - delta - 1
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def reask_messages(row: dict[str, Any], first_answer: str, reask: str) -> list[dict[str, Any]]:
    """The prompt of attempt 2: the conversation with attempt 1 and the re-ask, or the rewritten Q1 alone."""
    question = first_question(row)
    if reask == "conversation":
        return [
            *question,
            {"role": "assistant", "content": content_blocks(first_answer)},
            {"role": "user", "content": content_blocks(RECHECK_TEXT)},
        ]
    # Upstream re-tokenised the decoded Q1 prompt with its question replaced: image kept, no attempt 1.
    turn = question[0]
    blocks = [
        {**b, "text": b["text"].replace(Q1_TEXT, RECHECK_TEXT)} if b["type"] == "text" else b
        for b in turn["content"]
    ]
    return [{**turn, "content": blocks}]


@contextmanager
def seeded_sampling(*key: int):
    """Draws inside are seeded from ``key`` alone; the global RNG (dropout, data order) is left as it was."""
    import numpy as np
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1))
        yield


@dataclass
class Attempt:
    """Sampled answers of one attempt, as full sequences the policy and the reference score."""

    inputs: dict[str, Any]  # input_ids, attention_mask, pixel_values of prompt + answer
    answer_ids: Any  # (sequences, length) sampled tokens
    answer_mask: Any  # (sequences, length) 1 up to and including the end-of-turn token
    texts: list[str]
    temperature: float  # they were sampled at; their log-probabilities are of the same tempered policy


def image_token_ids(processor: Any) -> list[int]:
    """The ids of the tokens that mark or hold an image, which no answer may contain."""
    tokens = [processor.start_image_token, processor.image_token, processor.end_image_token]
    return processor.tokenizer.convert_tokens_to_ids(tokens)


def end_of_turn_ids(model: Any) -> list[int]:
    """The token ids that end an answer (the generation config's eos, one id or several)."""
    eos = model.generation_config.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def sample_attempt(
    policy: Any, processor: Any, prompts: list[dict[str, Any]], settings: TrainConfig
) -> Attempt:
    """Sample one answer to each prompt (rows whose ``messages`` are the whole prompt)."""
    import torch

    device = next(policy.parameters()).device
    inputs = prompt_inputs(processor, prompts, device, prompt=lambda row: row["messages"])
    with torch.no_grad():
        output = policy.generate(
            **inputs,
            do_sample=True,
            temperature=settings.sc_temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=settings.sc_max_new_tokens,
            # An image token in an answer would ask for an image feature the prompt does not have.
            suppress_tokens=image_token_ids(processor),
        )
    answer_ids = output[:, inputs["input_ids"].shape[1] :]
    ended = torch.isin(answer_ids, torch.tensor(end_of_turn_ids(policy), device=device))
    # Tokens up to and including the first end-of-turn; what generate padded after it is not an answer.
    after_end = (ended.cumsum(dim=1) - ended.long()) > 0
    answer_mask = (~after_end).long()
    full = {
        "input_ids": torch.cat([inputs["input_ids"], answer_ids], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], answer_mask], dim=1),
        "pixel_values": inputs["pixel_values"],
    }
    texts = [t.strip() for t in processor.batch_decode(answer_ids * answer_mask, skip_special_tokens=True)]
    return Attempt(full, answer_ids, answer_mask, texts, settings.sc_temperature)


def reference_attempt(
    processor: Any, prompts: list[dict[str, Any]], answers: list[str], eos_id: int, device: Any
) -> Attempt:
    """The reference answers as if sampled (at temperature 1) after the prompts: what the SFT term scores."""
    import torch

    inputs = prompt_inputs(processor, prompts, device, prompt=lambda row: row["messages"])
    encoded = [processor.tokenizer(a, add_special_tokens=False)["input_ids"] + [eos_id] for a in answers]
    length = max(len(ids) for ids in encoded)
    answer_ids = torch.tensor([ids + [eos_id] * (length - len(ids)) for ids in encoded], device=device)
    answer_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in encoded], device=device)
    full = {
        "input_ids": torch.cat([inputs["input_ids"], answer_ids], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], answer_mask], dim=1),
        "pixel_values": inputs["pixel_values"],
    }
    return Attempt(full, answer_ids, answer_mask, answers, 1.0)


def answer_logprobs(model: Any, attempt: Attempt) -> Any:
    """Log-probabilities ``model`` gives the sampled answer tokens (positions numbered as generate did)."""
    mask = attempt.inputs["attention_mask"]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    length = attempt.answer_ids.shape[1]
    logits = model(**attempt.inputs, position_ids=positions, logits_to_keep=length + 1).logits[:, :-1]
    return token_logprobs(logits / attempt.temperature, attempt.answer_ids)


def answer_nll(model: Any, attempt: Attempt) -> Any:
    """Mean negative log-likelihood of the answer tokens of ``attempt`` under ``model`` (an SFT loss)."""
    logprobs = answer_logprobs(model, attempt)
    return -(logprobs * attempt.answer_mask).sum() / attempt.answer_mask.sum()


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of SC rows as they are (images stay paths; prompts are built when sampling)."""
    return {"rows": rows}


class SCTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the two-attempt SC objective (module docstring)."""

    def __init__(self, *args: Any, ref_model: Any, settings: TrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model.to(self.args.device).requires_grad_(False).eval()
        self.settings = settings
        self._window: dict[str, list[float]] = defaultdict(list)
        self._micro = (-1, 0)  # (optimiser step, micro-batches seen in it): part of the sampling seed

    def _sampling_key(self) -> tuple[int, ...]:
        step, count = self._micro
        self._micro = (self.state.global_step, count + 1 if step == self.state.global_step else 0)
        return (self.settings.seed, self.state.global_step, self._micro[1], self.accelerator.process_index)

    def _phase_one(self) -> bool:
        return self.settings.sc_phases == "two-phase" and self.state.global_step < self.state.max_steps // 2

    def _attempts(
        self, model: Any, rows: list[dict[str, Any]]
    ) -> tuple[Attempt, Attempt, list[dict[str, Any]]]:
        """``sc_samples`` first answers per row, one second answer to each (sampled without grad), and
        the prompts of the second attempts."""
        settings = self.settings
        repeated = [
            {**row, "messages": first_question(row)} for row in rows for _ in range(settings.sc_samples)
        ]
        policy = self.accelerator.unwrap_model(model)
        was_training = policy.training
        policy.eval()
        with seeded_sampling(*self._sampling_key()):
            first = sample_attempt(policy, self.processing_class, repeated, settings)
            second_prompts = [
                {**row, "messages": reask_messages(row, text, settings.sc_reask)}
                for row, text in zip(repeated, first.texts, strict=True)
            ]
            second = sample_attempt(policy, self.processing_class, second_prompts, settings)
        policy.train(was_training)
        return first, second, second_prompts

    def _reference_loss(
        self, model: Any, second_prompts: list[dict[str, Any]], truth: list[str], right1: Any
    ) -> Any:
        """Mean negative log-likelihood of the reference answer after one second-attempt prompt per row:
        the sample whose first attempt was wrong when there is one (what a correction is learnt from)."""
        import torch

        samples = self.settings.sc_samples
        wrong = (~right1).view(-1, samples)
        picks = [row * samples + int(torch.argmax(wrong[row].int())) for row in range(wrong.shape[0])]
        reference = reference_attempt(
            self.processing_class,
            [second_prompts[i] for i in picks],
            [truth[i] for i in picks],
            end_of_turn_ids(self.accelerator.unwrap_model(model))[0],
            right1.device,
        )
        return answer_nll(model, reference)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        import torch

        settings, rows = self.settings, inputs["rows"]
        samples = settings.sc_samples
        truth = [t for t in reference_answers(rows) for _ in range(samples)]
        first, second, second_prompts = self._attempts(model, rows)
        device = first.answer_ids.device
        r1 = torch.tensor(
            [answer_reward(t, a) for t, a in zip(truth, first.texts, strict=True)], device=device
        )
        r2 = torch.tensor(
            [answer_reward(t, a) for t, a in zip(truth, second.texts, strict=True)], device=device
        )
        shaped = r2 + settings.sc_improvement_bonus * (r2 - r1)
        a1 = advantages(r1.view(-1, samples)).flatten()
        a2 = advantages(shaped.view(-1, samples)).flatten()

        logprobs1, logprobs2 = answer_logprobs(model, first), answer_logprobs(model, second)
        with torch.no_grad():
            ref1, ref2 = answer_logprobs(self.ref_model, first), answer_logprobs(self.ref_model, second)
        kl1 = kl_to_reference(logprobs1, ref1, first.answer_mask)
        kl2 = kl_to_reference(logprobs2, ref2, second.answer_mask)
        policy_loss = policy_gradient_loss(logprobs2, second.answer_mask, a2)
        if self._phase_one():
            kl = kl1
        else:
            policy_loss = policy_loss + policy_gradient_loss(logprobs1, first.answer_mask, a1)
            kl = kl1 + kl2
        loss = policy_loss + settings.sc_kl_weight * kl
        reference_nll = torch.zeros((), device=device)
        if settings.sc_reference_weight > 0:
            reference_nll = self._reference_loss(model, second_prompts, truth, r1 == 1.0)
            loss = loss + settings.sc_reference_weight * reference_nll

        exact1, exact2 = r1 == 1.0, r2 == 1.0
        for name, value in {
            "reward_attempt1": r1.mean(),
            "reward_attempt2": r2.mean(),
            "accuracy_attempt1": exact1.float().mean(),
            "accuracy_attempt2": exact2.float().mean(),
            "improvement_rate": (r2 > r1).float().mean(),
            "kl": kl.detach(),
            "policy_loss": policy_loss.detach(),
            "reference_nll": reference_nll.detach(),
            "fixed": (~exact1 & exact2).sum(),
            "broken": (exact1 & ~exact2).sum(),
        }.items():
            self._window[name].append(float(value))
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The trainer's record, with the SC metrics of the steps since the last one (training records)."""
        if "loss" in logs and self._window:
            for name, values in self._window.items():
                logs[name] = sum(values) if name in SUM_METRICS else sum(values) / len(values)
            self._window.clear()
        super().log(logs, start_time)


def build_sc_trainer(
    cfg: TrainConfig, policy: Any, processor: Any, training: TrainingData, args: dict[str, Any], ref: Any
) -> SCTrainer:
    """The SC trainer over ``training``'s rows, ``ref`` its frozen reference (a copy of the init)."""
    import datasets
    from transformers import TrainingArguments

    # max_length is trl's; SC's prompts and answers are bounded by the pre-flight and sc_max_new_tokens.
    arguments = TrainingArguments(**{k: v for k, v in args.items() if k != "max_length"})
    rows = datasets.Dataset.from_list(
        [{"images": r["images"], "messages": r["messages"]} for r in training.rows]
    )
    return SCTrainer(
        model=policy,
        args=arguments,
        train_dataset=rows,
        data_collator=collate_rows,
        processing_class=processor,
        ref_model=ref,
        settings=cfg,
    )


def only_right(right_a: list[bool], right_b: list[bool]) -> tuple[int, int]:
    """Frames only ``a`` gets right, frames only ``b`` gets right (``a`` after the re-ask: fixed, broken)."""
    return (
        sum(a and not b for a, b in zip(right_a, right_b, strict=True)),
        sum(b and not a for a, b in zip(right_a, right_b, strict=True)),
    )


def sign_test_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar (sign) test of the answers a re-ask changed: the chance that answers
    changed at random (each a fix or a break with even odds) split at least as unevenly as these counts."""
    changed = fixed + broken
    if changed == 0:
        return 1.0
    tail = sum(math.comb(changed, k) for k in range(min(fixed, broken) + 1)) / 2**changed
    return min(1.0, 2 * tail)


def two_attempt_accuracy(
    policy: Any,
    processor: Any,
    rows: list[dict[str, Any]],
    reask: str = "conversation",
    batch_size: int = 32,
) -> dict[str, Any]:
    """Greedy Q1 accuracy of attempt 1 and of attempt 2 (after the re-ask), and what the re-ask changed.

    Returns:
        ``attempt1`` and ``attempt2`` exact-match accuracy, ``fixed`` (wrong, then right), ``broken``
        (right, then wrong), ``p_value`` (``sign_test_p`` of the two counts) and ``n``.
    """
    truth = reference_answers(rows)
    first = generate_answers(policy, processor, rows, batch_size)
    second_rows = [
        {**row, "messages": reask_messages(row, answer, reask)}
        for row, answer in zip(rows, first, strict=True)
    ]
    second = generate_answers(policy, processor, second_rows, batch_size, prompt=lambda row: row["messages"])
    right1 = [a == t for a, t in zip(first, truth, strict=True)]
    right2 = [a == t for a, t in zip(second, truth, strict=True)]
    n = len(rows)
    fixed, broken = only_right(right2, right1)
    return {
        "n": n,
        "attempt1": round(sum(right1) / n, 4) if n else None,
        "attempt2": round(sum(right2) / n, 4) if n else None,
        "fixed": fixed,
        "broken": broken,
        "p_value": round(sign_test_p(fixed, broken), 4),
    }


def evaluate_two_attempts(
    model_dir: Path, test: TrainingData, preset_name: str, reask: str = "conversation", batch_size: int = 32
) -> dict[str, Any]:
    """``two_attempt_accuracy`` of a saved model on the rows of a (held-out) dataset."""
    from occ_core.train.model import load_model, resolve_device
    from occ_core.train.presets import get_preset

    policy, processor = load_model(model_dir, get_preset(preset_name))
    policy.to(resolve_device("auto"))
    return two_attempt_accuracy(policy, processor, test.rows, reask, batch_size)
