"""Greedy answers of a model to the rows' first question, many images per ``generate`` call.

Used after SFT1 (cross-predicted Q1 answers on the training split, for the model-errors grader) and
to report each stage's Q1 accuracy on the held-out test split. Prompts are left-padded so every
sequence of a batch ends where generation starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from occ_core.train.data import TrainingData

# A row's prompt: the chat messages a model answers.
Prompt = Callable[[dict[str, Any]], list[dict[str, Any]]]


def first_question(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's conversation cut to its first (human) turn: the prompt a model answers."""
    return row["messages"][:1]


def prompt_inputs(
    processor: Any, rows: list[dict[str, Any]], device: Any, prompt: Prompt = first_question
) -> Any:
    """The rows' prompts (``prompt(row)``, default the first question) with their images, left-padded."""
    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    conversations = []
    for row in rows:
        images = [Image.open(path).convert("RGB") for path in row["images"]]
        conversations.append(prepare_multimodal_messages(prompt(row), images=images))
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    ).to(device)


def generate_answers(
    policy: Any,
    processor: Any,
    rows: list[dict[str, Any]],
    batch_size: int = 32,
    max_new_tokens: int = 16,
    prompt: Prompt = first_question,
) -> list[str]:
    """The model's greedy answer to each row's prompt (default its first question), in row order."""
    import torch

    device = next(policy.parameters()).device
    policy.eval()
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        inputs = prompt_inputs(processor, rows[start : start + batch_size], device, prompt)
        with torch.inference_mode():
            output = policy.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def reference_answers(rows: list[dict[str, Any]]) -> list[str]:
    """The ground-truth answer of each row's first question."""
    return ["".join(b["text"] or "" for b in row["messages"][1]["content"]) for row in rows]


def accuracy_report(answers: list[str], truth: list[str]) -> dict[str, Any]:
    """Exact-match accuracy (the method's rule: case, period and all) next to chance and the majority rate."""
    from occ_core.classes import QA_CLASSES

    n = len(truth)
    correct = sum(a == t for a, t in zip(answers, truth, strict=True))
    majority_answer, majority_count = Counter(truth).most_common(1)[0] if truth else ("", 0)
    return {
        "n": n,
        "correct": correct,
        "accuracy": round(correct / n, 4) if n else None,
        "chance": round(1 / len(QA_CLASSES), 4),
        "majority_rate": round(majority_count / n, 4) if n else None,
        "majority_answer": majority_answer,
        "over_majority": round(correct / majority_count, 3) if majority_count else None,
    }


def evaluate_rows(
    model_dir: Path, rows: list[dict[str, Any]], preset_name: str, batch_size: int = 32
) -> list[str]:
    """A saved model's greedy answers to the rows' first question."""
    from occ_core.train.model import load_model, resolve_device
    from occ_core.train.presets import get_preset

    policy, processor = load_model(model_dir, get_preset(preset_name))
    policy.to(resolve_device("auto"))
    return generate_answers(policy, processor, rows, batch_size)


def evaluate_q1(
    model_dir: Path, test: TrainingData, preset_name: str, batch_size: int = 32
) -> dict[str, Any]:
    """Q1 accuracy of a saved model on the rows of a (held-out) dataset."""
    answers = evaluate_rows(model_dir, test.rows, preset_name, batch_size)
    return accuracy_report(answers, reference_answers(test.rows))
