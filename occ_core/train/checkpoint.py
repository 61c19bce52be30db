"""Checkpoints that are either complete or absent, resume points, fingerprints and the model card.

Layout of a stage's OUT folder::

    OUT/config.json, model.safetensors, tokenizer + processor files   the final model (standard HF)
    OUT/occ_card.json                                                  written last: OUT is complete
    OUT/checkpoints/checkpoint-N/ ... + occ_complete                   intermediate, resumable
    OUT/tensorboard/, OUT/metrics.jsonl, OUT/loss_curve.png            metrics

transformers writes ``checkpoint-N`` in place, so a SIGKILL during a save leaves a directory that
looks like a checkpoint. occ marks a checkpoint complete (``occ_complete``) only after the trainer has
finished saving it, resumes from the newest marked one, and deletes unmarked ones. The final model
is saved into ``OUT/.final.partial`` and moved in; ``occ_card.json`` is written last, atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from occ_core.errors import StageError
from occ_core.fsio import write_json_atomic

CARD = "occ_card.json"
COMPLETE_MARK = "occ_complete"
CHECKPOINTS = "checkpoints"
WEIGHT_SUFFIXES = (".safetensors",)


class CheckpointError(StageError):
    """A directory that should hold a model does not (missing, half-written or corrupt)."""


class MarkCompleteCheckpoints(TrainerCallback):
    """Writes ``occ_complete`` into each checkpoint once the trainer has saved all of it."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' callback signature
        if state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE_MARK).write_text(
                json.dumps({"step": state.global_step})
            )
        return control


def _step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def resume_point(out: Path) -> Path | None:
    """The newest complete checkpoint under ``OUT/checkpoints``; incomplete ones are deleted."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()), key=_step)
    for path in [p for p in found if not (p / COMPLETE_MARK).is_file()]:
        shutil.rmtree(path)  # killed while saving: its files cannot be trusted
    complete = [p for p in found if (p / COMPLETE_MARK).is_file()]
    return complete[-1] if complete else None


def load_weights(policy: Any, checkpoint_dir: Path) -> None:
    """Put a checkpoint's weights into ``policy`` before the trainer resumes from it.

    transformers saves InternVL under its original key names and maps them back in ``from_pretrained``,
    but the trainer's own resume loads the raw file, matches no key, and silently keeps the fresh
    weights (seen with transformers 5.24). Loading through ``from_pretrained`` applies the mapping;
    the trainer then restores the optimizer, scheduler, RNG and step as usual.
    """
    loaded = type(policy).from_pretrained(checkpoint_dir, dtype=next(policy.parameters()).dtype)
    policy.load_state_dict(loaded.state_dict())


def weight_files(model_dir: Path) -> list[Path]:
    """The weight shards of a HF model directory, sorted."""
    return sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def fingerprint(model_dir: Path) -> str:
    """Content hash of a model's weights (its card's value when occ wrote it)."""
    card = read_card(model_dir)
    if card and card.get("fingerprint"):
        return str(card["fingerprint"])
    return fingerprint_files(model_dir)


def read_card(model_dir: Path) -> dict[str, Any] | None:
    """The model card of an occ output, or None when the directory has none."""
    path = Path(model_dir) / CARD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable model card ({exc})") from exc


def check_model_dir(model_dir: Path) -> Path:
    """A directory a model can be loaded from: config, readable weights, and complete if occ wrote it.

    Raises:
        CheckpointError: Names the directory or file and what is wrong with it.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    try:
        json.loads(config.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config}: corrupt config ({exc})") from exc
    if (path / CHECKPOINTS).is_dir() and read_card(path) is None:
        raise CheckpointError(
            f"{path}: incomplete training output (no {CARD}): the run that wrote it did not finish; "
            "run the same command again to resume it"
        )
    shards = weight_files(path)
    if not shards:
        raise CheckpointError(f"{path}: no weights (*.safetensors)")
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:
                    handle.get_slice(keys[-1])
        except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a truncated file
            raise CheckpointError(f"{shard}: corrupt or truncated weights ({exc})") from exc
    return path


def publish_final(staging: Path, out: Path, card: dict[str, Any]) -> Path:
    """Move a fully saved model from ``staging`` into OUT, then write the card (last, atomically).

    Returns:
        The card's path.
    """
    out, staging = Path(out), Path(staging)
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    staging.rmdir()
    card = {**card, "fingerprint": fingerprint_files(out)}
    return write_json_atomic(out / CARD, card)


def fingerprint_files(model_dir: Path) -> str:
    """Content hash of the weight files alone, ignoring any card."""
    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()
