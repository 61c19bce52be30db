"""The base model's identity: what a stage started from the preset's base depends on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from occ_core.train import model, tiny
from occ_core.train.checkpoint import fingerprint_files
from occ_core.train.presets import get_preset


def test_tiny_base_fingerprint_names_the_shipped_tower() -> None:
    assert model.base_fingerprint(get_preset("tiny")).endswith(fingerprint_files(tiny.VISION_ASSET)[:16])


def test_a_new_tower_changes_the_tiny_base_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = model.base_fingerprint(get_preset("tiny"))
    tower = tmp_path / "tower"
    shutil.copytree(tiny.VISION_ASSET, tower)
    weights = tower / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    monkeypatch.setattr(tiny, "VISION_ASSET", tower)
    assert model.base_fingerprint(get_preset("tiny")) != before


def test_real_preset_base_is_named_by_its_preset() -> None:
    assert model.base_fingerprint(get_preset("internvl-1b")) == "base:internvl-1b"
