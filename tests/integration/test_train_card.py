"""A stage's model card carries the trainer's throughput and the run's peak GPU memory.

Run alone: ``.venv/bin/python -m pytest tests/integration/test_train_card.py`` (tiny preset, 2 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from occ_core.train.checkpoint import CARD
from occ_core.train.config import TrainConfig
from occ_core.train.run import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_card_records_runtime_samples_per_second_and_peak_memory(train_data: Path, tmp_path: Path):
    out = tmp_path / "sft1"
    cfg = TrainConfig(stage="sft1", data=train_data, out=out, max_steps=2, logging_steps=1, device="cpu")
    card = train(cfg)
    written = json.loads((out / CARD).read_text())
    for record in (card, written):
        assert record["train_runtime"] > 0 and record["train_samples_per_second"] > 0, record
        assert record["peak_memory_gib"] is None  # on cpu; {allocated, reserved} GiB on cuda
