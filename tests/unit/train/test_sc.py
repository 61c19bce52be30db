"""SC objective: the reward, and the three upstream bugs shown absent (method-spec section 5).

Run alone: ``.venv/bin/python -m pytest tests/unit/train/test_sc.py`` (tiny model built from a config).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from occ_core.cot import Q1_TEXT, RECHECK_TEXT, conversation_messages
from occ_core.train import sc
from occ_core.train.config import StageSettings, TrainConfig
from occ_core.train.data import TrainingData


@pytest.mark.parametrize(
    ("truth", "answer", "reward"),
    [
        ("The object is jar.", "The object is jar.", 1.0),  # exact
        ("The object is jar.", "  the OBJECT is Jar. ", 1.0),  # case and surrounding space
        ("abcd", "abcx", 0.75),  # one substitution in 4: 0.001 + 0.999 * 3/4 = 0.75025
        ("The object is jar.", "The object is can.", 0.89),  # j->c, r->n: 0.001 + 0.999 * 16/18
        ("The object is jar.", "", 0.0),  # nothing in common: 0.001 rounds to 0
    ],
)
def test_reward_is_exact_match_else_the_upstream_levenshtein_similarity(truth, answer, reward):
    assert sc.answer_reward(truth, answer) == reward


def test_levenshtein_distance():
    assert sc.levenshtein("kitten", "sitting") == 3
    assert sc.levenshtein("", "abc") == 3 and sc.levenshtein("abc", "abc") == 0


def test_leave_one_out_baseline_and_batch_mean_for_one_sample():
    loo = sc.advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(loo, torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3], [0.0, 0.0, 0.0, 0.0]]))
    single = sc.advantages(torch.tensor([[1.0], [0.0]]))
    assert torch.allclose(single, torch.tensor([[0.5], [-0.5]]))


# --- bug 1: the gradient flows through the sampled tokens' log-probabilities only --------------------


def test_policy_gradient_on_unsampled_logits_is_what_the_softmax_implies():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.tensor([[1, 4, 0], [2, 2, 3]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the first answer ended after 2 tokens
    advantage = torch.tensor([0.7, -0.3])
    loss = sc.policy_gradient_loss(sc.token_logprobs(logits, tokens), mask, advantage)
    (grad,) = torch.autograd.grad(loss, logits)

    # loss = -mean_i A_i sum_t log p(y_it): d loss / d z_itj = -(A_i / N) (1[j = y_it] - p_itj).
    p = torch.softmax(logits.detach(), dim=-1)
    onehot = torch.nn.functional.one_hot(tokens, 5).float()
    expected = -(advantage[:, None, None] / 2) * (onehot - p) * mask[..., None]
    assert torch.allclose(grad, expected, atol=1e-7)
    unsampled = onehot == 0
    assert torch.allclose(grad[unsampled], (advantage[:, None, None] / 2 * p * mask[..., None])[unsampled])
    assert torch.all(grad[0, 2] == 0)  # after the answer ended: no gradient at all

    # Zero reward everywhere: zero advantage, zero policy gradient.
    zero = sc.advantages(torch.zeros(1, 2)).flatten()
    loss = sc.policy_gradient_loss(sc.token_logprobs(logits, tokens), mask, zero)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad == 0)


# --- bug 2: the KL is against a separate frozen reference ------------------------------------------


@pytest.fixture
def sc_trainer(tmp_path):
    from transformers import set_seed

    from occ_core.train.tiny import build_tiny

    set_seed(0)
    policy, processor = build_tiny(seed=0)
    reference, _ = build_tiny(seed=0)
    image = tmp_path / "frame.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    turns = [
        {"from": "human", "value": f"{Q1_TEXT}\n<image>"},
        {"from": "gpt", "value": "The object is jar."},
    ]
    rows = [
        {"id": str(i), "images": [str(image)], "messages": conversation_messages(turns)} for i in range(2)
    ]
    cfg = TrainConfig(stage="sc", data=tmp_path, init=tmp_path, out=tmp_path / "out", sc_samples=2)
    args = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none"}
    training = TrainingData("sc", tmp_path / "sc.jsonl", rows, {})
    return sc.build_sc_trainer(cfg, policy, processor, training, args, reference), rows


def _loss_and_kl(trainer, rows) -> tuple[float, float]:
    trainer._micro = (-1, 0)  # the same sampling seed every call: the same sampled answers
    loss = trainer.compute_loss(trainer.model, {"rows": rows})
    return loss.item(), trainer._window["kl"][-1]


def test_kl_is_against_a_separate_frozen_reference_and_grows_once_the_policy_moves(sc_trainer):
    trainer, rows = sc_trainer
    assert trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    _, kl_start = _loss_and_kl(trainer, rows)
    assert kl_start == pytest.approx(0.0, abs=1e-6)

    reference_before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    with torch.no_grad():
        trainer.model.lm_head.weight.add_(0.05 * torch.randn_like(trainer.model.lm_head.weight))
    loss, kl_moved = _loss_and_kl(trainer, rows)
    assert kl_moved > 1e-4
    assert all(torch.equal(v, trainer.ref_model.state_dict()[k]) for k, v in reference_before.items())

    # The KL enters the loss with its own weight, sc_kl_weight: loss(w) - loss(0) = w * KL.
    weight = trainer.settings.sc_kl_weight
    trainer.settings = trainer.settings.model_copy(update={"sc_kl_weight": 0.0})
    loss_without, _ = _loss_and_kl(trainer, rows)
    assert loss - loss_without == pytest.approx(weight * kl_moved, rel=1e-4)


# --- bug 3: each weight is named for what it does ------------------------------------------------


def test_sc_weights_are_named_for_what_they_weigh():
    fields = StageSettings.model_fields
    assert not [name for name in fields if re.fullmatch(r"(sc_)?beta_?\d", name)]
    for name in ("sc_kl_weight", "sc_improvement_bonus", "sc_samples", "sc_temperature", "sc_phases"):
        assert fields[name].description.startswith("SC: "), name
    assert (
        "KL" in fields["sc_kl_weight"].description and "r2 - r1" in fields["sc_improvement_bonus"].description
    )


def test_attempt_two_sees_attempt_one_in_conversation_mode_and_the_rewritten_question_alone_otherwise():
    turns = [
        {"from": "human", "value": f"{Q1_TEXT}\n<image>"},
        {"from": "gpt", "value": "The object is jar."},
    ]
    row = {"messages": conversation_messages(turns)}
    talk = sc.reask_messages(row, "The object is can.", "conversation")
    assert [m["role"] for m in talk] == ["user", "assistant", "user"]
    assert (
        talk[1]["content"][0]["text"] == "The object is can."
        and talk[2]["content"][0]["text"] == RECHECK_TEXT
    )
    (alone,) = sc.reask_messages(row, "The object is can.", "rewrite")
    assert [b["type"] for b in alone["content"]] == ["text", "image"]
    assert alone["content"][0]["text"] == f"{RECHECK_TEXT}\n"


def test_sampling_seed_repeats_draws_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    with sc.seeded_sampling(0, 3, 1, 0):
        first = torch.rand(3)
    assert torch.equal(torch.rand(1), expected_next)
    with sc.seeded_sampling(0, 3, 1, 0):
        assert torch.equal(torch.rand(3), first)
    with sc.seeded_sampling(0, 4, 0, 0):
        assert not torch.equal(torch.rand(3), first)


# --- the reference term: the SFT anchor that gives the conversation re-ask a class answer to start from


def test_reference_answer_is_scored_where_the_chat_template_puts_the_assistant_turn(sc_trainer):
    from PIL import Image as PILImage
    from trl.data_utils import prepare_multimodal_messages

    trainer, rows = sc_trainer
    processor = trainer.processing_class
    prompt = {**rows[0], "messages": sc.reask_messages(rows[0], "The object is can.", "conversation")}
    eos = trainer.model.generation_config.eos_token_id
    attempt = sc.reference_attempt(processor, [prompt], ["The object is jar."], eos, torch.device("cpu"))
    assert processor.batch_decode(attempt.answer_ids, skip_special_tokens=True) == ["The object is jar."]
    assert attempt.answer_ids[0, -1].item() == eos and attempt.answer_mask.all()

    conversation = [
        *prompt["messages"],
        {"role": "assistant", "content": [{"type": "text", "text": "The object is jar."}]},
    ]
    images = [PILImage.open(rows[0]["images"][0]).convert("RGB")]
    whole = processor.apply_chat_template(
        [prepare_multimodal_messages(conversation, images=images)],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"][0]
    scored = attempt.inputs["input_ids"][0]
    assert torch.equal(whole[: len(scored)], scored)


def test_reference_term_enters_the_loss_with_its_weight_and_trains_the_truth_after_the_reask(sc_trainer):
    trainer, rows = sc_trainer
    trainer.settings = trainer.settings.model_copy(update={"sc_reference_weight": 0.0})
    loss_without, _ = _loss_and_kl(trainer, rows)
    assert trainer._window["reference_nll"][-1] == 0.0
    trainer.settings = trainer.settings.model_copy(update={"sc_reference_weight": 2.0})
    loss_with, _ = _loss_and_kl(trainer, rows)
    nll = trainer._window["reference_nll"][-1]
    assert nll > 0 and loss_with - loss_without == pytest.approx(2.0 * nll, rel=1e-4)


def test_reference_term_picks_the_sample_whose_first_attempt_was_wrong(sc_trainer, monkeypatch):
    trainer, rows = sc_trainer
    seen = {}

    def capture(processor, prompts, answers, eos_id, device):
        seen["prompts"] = prompts
        raise StopIteration

    monkeypatch.setattr(sc, "reference_attempt", capture)
    prompts = [{"messages": [f"row{r}-sample{s}"]} for r in range(2) for s in range(2)]
    right = torch.tensor([True, False, True, True])  # row 0: sample 1 wrong; row 1: none wrong
    with pytest.raises(StopIteration):
        trainer._reference_loss(trainer.model, prompts, ["t"] * 4, right)
    assert [p["messages"][0] for p in seen["prompts"]] == ["row0-sample1", "row1-sample0"]


@pytest.mark.parametrize("fixed,broken", [(3, 1), (28, 13), (13, 28), (10, 10), (0, 5), (16, 14), (40, 0)])
def test_sign_test_is_the_exact_two_sided_binomial_test_of_fixed_against_broken(fixed, broken):
    from scipy.stats import binomtest

    expected = binomtest(fixed, fixed + broken, 0.5, alternative="two-sided").pvalue
    assert sc.sign_test_p(fixed, broken) == pytest.approx(expected, rel=1e-9)


def test_sign_test_of_a_re_ask_that_changed_nothing_is_one_and_of_the_demo_split_is_noise():
    assert sc.sign_test_p(0, 0) == 1.0
    # The demo's SC: fixed 3, broke 1 -> P(split at least this uneven | even odds) = 2 * 5/16.
    assert sc.sign_test_p(3, 1) == 0.625


def test_paired_counts_the_frames_only_one_side_gets_right():
    assert sc.only_right([True, True, False, False], [True, False, True, False]) == (1, 1)
    assert sc.only_right([True, True, True], [False, False, True]) == (2, 0)
