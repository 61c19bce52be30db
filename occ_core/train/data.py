"""Training data: the datasets stage's files as trl datasets, checked before any training step.

SFT stages read ``DATA/<name>.jsonl`` (InternVL rows, the method's own format) with the image root
of ``DATA/<name>.meta.json``; every turn becomes a chat message whose content keeps the image where
the human turn has ``<image>`` (after the question for Q1, as upstream). ``assistant_only_loss`` then
trains every assistant turn: SFT2 learns the Q1 answer and the clarity answer. MPO reads
``DATA/pairs.jsonl``: ``<image>\\n`` + Q6 as a single-turn prompt, as the upstream DPO loader builds it.

``preflight`` runs before a trainer exists: every image must exist and decode, every sample must fit
``max_length`` with all its image tokens, and a dataset must not be degenerate (one class only, one
clarity label only, no pairs).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from occ_core import obman
from occ_core.cot import IMAGE_TOKEN, NO, YES, content_blocks, conversation_messages
from occ_core.errors import BadSample, StageError
from occ_core.jsonl import iter_jsonl


class DataError(StageError):
    """A training dataset is missing, malformed or degenerate; raised before any training step."""


@dataclass
class TrainingData:
    """Rows ready for a trl trainer, with what the pre-flight pass learned about them."""

    name: str
    path: Path
    rows: list[dict[str, Any]]  # {"id", "images": [path], "messages"} or {"prompt", "chosen", "rejected"}
    label_counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.rows)


def image_root(data_dir: Path, name: str) -> Path:
    """The image folder recorded in ``DATA/<name>.meta.json`` (InternVL's meta format)."""
    meta = Path(data_dir) / f"{name}.meta.json"
    if not meta.is_file():
        raise DataError(f"{meta}: missing; DATA must be a directory written by the datasets stage")
    try:
        return Path(json.loads(meta.read_text())[name]["root"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta}: not an InternVL meta file for {name!r} ({exc})") from exc


def _jsonl(data_dir: Path, name: str) -> Path:
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing; DATA must be a directory written by the datasets stage")
    return path


def _records(path: Path):
    # Our own datasets stage wrote these files: a bad line means a damaged file, not a sample to skip.
    for line_no, record in iter_jsonl(path):
        if isinstance(record, BadSample):
            raise DataError(str(record))
        yield line_no, record


def load_sft(data_dir: Path, name: str) -> TrainingData:
    """SFT rows of ``DATA/<name>.jsonl``: one image, the conversation as messages, labels counted."""
    path, root = _jsonl(data_dir, name), image_root(data_dir, name)
    rows, labels = [], Counter()
    for line_no, record in _records(path):
        try:
            messages = conversation_messages(record["conversations"])
            rows.append({"id": record["id"], "images": [str(root / record["image"])], "messages": messages})
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}:{line_no}: not an InternVL conversation row ({exc})") from exc
        for turn in record["conversations"][1::2]:
            labels[turn["value"]] += 1
    return TrainingData(name, path, rows, dict(labels))


def load_pairs(data_dir: Path, name: str = "pairs") -> TrainingData:
    """MPO pairs of ``DATA/<name>.jsonl`` as trl preference rows (``<image>\\n`` + Q6, as upstream)."""
    path, root = _jsonl(data_dir, name), image_root(data_dir, name)
    rows, labels = [], Counter()
    for line_no, record in _records(path):
        try:
            question = record["question"]
            if IMAGE_TOKEN not in question:
                question = f"{IMAGE_TOKEN}\n{question}"
            rows.append(
                {
                    "id": record.get("id", record["image"]),
                    "images": [str(root / record["image"])],
                    "prompt": [{"role": "user", "content": content_blocks(question)}],
                    "chosen": [{"role": "assistant", "content": content_blocks(record["chosen"])}],
                    "rejected": [{"role": "assistant", "content": content_blocks(record["rejected"])}],
                }
            )
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}:{line_no}: not a preference pair ({exc})") from exc
        labels[record["chosen"]] += 1
    return TrainingData(name, path, rows, dict(labels))


def check_not_degenerate(data: TrainingData, stage: str) -> None:
    """An SFT1 set with one answer only, a clarity set with one label only, or no pairs is an error.

    Raises:
        DataError: Names the file and the counts.
    """
    if not data.rows:
        raise DataError(f"{data.path}: no rows to train on")
    counts = ", ".join(f"{k!r}: {v}" for k, v in sorted(data.label_counts.items()))
    if stage == "sft1" and len(data.label_counts) < 2:
        raise DataError(f"{data.path}: every Q1 answer is the same ({counts}); nothing to learn")
    if stage in ("sft2", "mpo"):
        clarity = {k: v for k, v in data.label_counts.items() if k in (YES, NO)}
        if len(clarity) < 2:
            raise DataError(
                f"{data.path}: only one clarity label ({counts or 'none'}); rebuild the datasets with "
                "a grader that finds both clear and unclear images"
            )


def _check_image(path: str) -> str | None:
    # The readers' own decoder (occ_core.obman), so training refuses exactly what the data stages refuse.
    if not Path(path).is_file():
        return "missing image"
    try:
        obman.read_rgb(Path(path))
    except BadSample as bad:
        return bad.reason
    return None


def sample_length(processor: Any, row: dict[str, Any]) -> int:
    """Tokens of one row with every image expanded to its context tokens (the longest of chosen/rejected)."""
    conversations = (
        [row["messages"]] if "messages" in row else [row["prompt"] + row[k] for k in ("chosen", "rejected")]
    )
    expanded = (
        processor.start_image_token
        + processor.image_token * processor.image_seq_length
        + processor.end_image_token
    )
    lengths = []
    for messages in conversations:
        text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
        text = text.replace(processor.image_token, "\0").replace("\0", expanded)
        lengths.append(len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]))
    return max(lengths)


def preflight(data: TrainingData, processor: Any, max_length: int | None) -> dict[str, int]:
    """Check every image and every sample's length before training; return the longest sample.

    Raises:
        DataError: The first bad sample, named by id and file, with the count of bad ones.
    """
    bad = []
    for row in data.rows:
        reason = _check_image(row["images"][0])
        if reason:
            bad.append(f"sample {row['id']}: {row['images'][0]}: {reason}")
    if bad:
        raise DataError(f"{data.path}: {len(bad)} of {len(data)} samples unusable; first: {bad[0]}")
    # Rows repeat a handful of conversations (8 classes x 2 labels): measure each distinct one once.
    lengths: dict[str, int] = {}
    longest = 0
    for row in data.rows:
        key = json.dumps(row.get("messages") or [row["prompt"], row["chosen"], row["rejected"]])
        if key not in lengths:
            lengths[key] = sample_length(processor, row)
        if max_length is not None and lengths[key] > max_length:
            raise DataError(
                f"{data.path}: sample {row['id']} is {lengths[key]} tokens with its image tokens, "
                f"over max_length {max_length}"
            )
        longest = max(longest, lengths[key])
    return {"samples": len(data), "longest_tokens": longest}


def to_dataset(data: TrainingData) -> Any:
    """The rows as a ``datasets.Dataset`` whose ``images`` column decodes files on access."""
    import datasets

    columns = [k for k in data.rows[0] if k != "id"]
    table = datasets.Dataset.from_list([{k: row[k] for k in columns} for row in data.rows])
    return table.cast_column("images", datasets.Sequence(datasets.Image()))
