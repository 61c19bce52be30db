"""Loading the model a stage starts from, and which of its parameters train.

A stage starts from the preset's base model (``tiny``: built from a config with occ's pre-trained
tower; real presets: their local checkpoint) or from ``--init`` (an earlier stage's OUT, or any
native InternVL directory). The processor travels with every checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from occ_core.train.checkpoint import check_model_dir
from occ_core.train.presets import TEMPLATES, Preset, VisionPolicy
from occ_core.train.processor import load_processor


def resolve_device(device: str) -> str:
    """``auto`` becomes cuda when a GPU is visible, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _ensure_training_template(processor: Any, preset: Preset) -> None:
    # A checkpoint's own template may lack {% generation %} markers, without which trl cannot mask
    # everything but the assistant turns; occ's template of the preset's family has them.
    template = processor.chat_template or ""
    if "{% generation %}" not in template:
        processor.chat_template = TEMPLATES[preset.template]
        processor.tokenizer.chat_template = TEMPLATES[preset.template]


def load_model(path: Path, preset: Preset, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """A checked model directory as (model, processor), fp32 weights (autocast decides compute dtype).

    Raises:
        CheckpointError: The directory is missing, incomplete or corrupt.
    """
    import torch
    from transformers import InternVLForConditionalGeneration

    check_model_dir(path)
    model = InternVLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation
    )
    processor = load_processor(path, model.config.image_seq_length)
    _ensure_training_template(processor, preset)
    return model, processor


def base_model(
    preset: Preset, directory: Path | None, seed: int, attn_implementation: str = "sdpa"
) -> tuple[Any, Any, str]:
    """The preset's starting model (``directory``: a real preset's folder), its processor, its origin."""
    if preset.directory is None:
        from occ_core.train.tiny import VISION_ASSET, build_tiny

        model, processor = build_tiny(VISION_ASSET, seed=seed)
        return model, processor, f"tiny (built from config, tower {VISION_ASSET.name}, seed {seed})"
    model, processor = load_model(directory, preset, attn_implementation)
    return model, processor, str(directory)


def base_fingerprint(preset: Preset) -> str:
    """What a stage started from the preset's base model depends on, for the run key.

    The tiny base is built from code and the shipped tower, so the tower's weights are part of it (a
    new tower retrains every stage). A real preset's base is named by its preset only: hashing gigabytes
    of weights at every cache check costs more than it saves, so replacing the weights in its folder
    needs a new ``--out`` (README, "Training").
    """
    if preset.directory is None:
        from occ_core.train.checkpoint import fingerprint_files
        from occ_core.train.tiny import VISION_ASSET

        return f"base:{preset.name}:tower {fingerprint_files(VISION_ASSET)[:16]}"
    return f"base:{preset.name}"


def base_checkpoint(preset: Preset, models_root: Path, seed: int = 0) -> Path:
    """A directory holding the preset's untrained base, for scoring it beside the trained stages.

    A real preset's is its folder under ``models_root``; the tiny base is built from its config and
    the shipped tower and saved once under ``data_root/train/base-tiny-<fingerprint>`` (written to a
    staging folder, then renamed, so a half-written base is never taken for one).
    """
    from occ_core.stage import params_hash, stage_dir
    from occ_core.train.checkpoint import CARD
    from occ_core.train.presets import preset_directory

    if preset.directory is not None:
        return preset_directory(preset, models_root)
    identity = base_fingerprint(preset)
    out = stage_dir("train", f"base-{preset.name}-{params_hash({'base': identity, 'seed': seed})}")
    if (out / CARD).is_file():
        return out
    model, processor, source = base_model(preset, None, seed)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    card = {"stage": "base", "preset": preset.name, "source": source, "init_fingerprint": identity}
    (staging / CARD).write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return out


def apply_vision_policy(model: Any, policy: VisionPolicy) -> dict[str, int]:
    """Freeze the vision tower (``frozen``), all of it but its last layer (``last``), or nothing (``full``).

    Returns:
        Total and trainable parameter counts after the policy.
    """
    tower = model.model.vision_tower
    if policy == "frozen":
        tower.requires_grad_(False)
    elif policy == "last":
        tower.requires_grad_(False)
        tower.encoder.layer[-1].requires_grad_(True)
    else:
        tower.requires_grad_(True)
    return parameter_counts(model)


def parameter_counts(model: Any) -> dict[str, int]:
    """Parameters in all, trainable, and in the vision tower."""
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "vision": sum(p.numel() for p in model.model.vision_tower.parameters()),
    }
