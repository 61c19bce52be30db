"""occ train --stage sc on the tiny preset: metrics logged, card written, every trainable weight moves.

Run alone: ``.venv/bin/python -m pytest tests/integration/test_train_sc.py`` (a tiny SFT1 of 8 steps, then
a few SC steps on the 20-frame fixture data), a SIGKILL-resume and the usage error without ``--init``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from occ_core.train.checkpoint import CARD
from occ_core.train.config import TrainConfig
from occ_core.train.run import train
from tests.integration.test_train import (
    OCC,
    QUICK,
    TOWER,
    _train_command,
    _weights,
    killed_and_rerun_matches_whole,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SC_METRICS = ("reward_attempt1", "reward_attempt2", "improvement_rate", "fixed", "broken", "kl", "loss")


@pytest.fixture(scope="module")
def sft1(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sc") / "sft1"
    train(TrainConfig(stage="sft1", data=train_data, out=out, **QUICK))
    return out


def test_sc_logs_its_metrics_writes_a_card_and_moves_every_trainable_weight(sft1, train_data, tmp_path):
    out = tmp_path / "sc"
    command = [
        *OCC,
        "train",
        "--stage",
        "sc",
        "--data",
        str(train_data),
        "--init",
        str(sft1),
        "--out",
        str(out),
    ]
    options = ["--device", "cpu", "--max-steps", "4", "--logging-steps", "1", "--test", str(train_data)]
    result = subprocess.run([*command, *options], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["stage"] == "sc" and report["final_step"] == 4
    for model in ("init", "sc"):
        figures = report["test_two_attempts"][model]
        assert figures["n"] == 20 and {"attempt1", "attempt2", "fixed", "broken"} <= set(figures)

    card = json.loads((out / CARD).read_text())
    assert card["stage"] == "sc" and card["settings"]["sc_reask"] == "conversation"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(set(SC_METRICS) <= set(r) for r in records), records[0]
    assert (out / "loss_curve.png").stat().st_size > 0 and any((out / "tensorboard").glob("events.*"))
    # A policy-gradient loss need not fall; every weight outside the frozen tower must move.
    before, after = _weights(sft1), _weights(out)
    unchanged = [n for n in after if not n.startswith(TOWER) and torch.equal(after[n], before[n])]
    assert not unchanged, f"trainable parameters that did not change: {unchanged[:5]}"
    assert all(torch.equal(after[n], before[n]) for n in after if n.startswith(TOWER))


def test_sc_without_init_is_a_usage_error(train_data, tmp_path):
    command = [*OCC, "train", "--stage", "sc", "--data", str(train_data), "--out", str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "--stage sc needs --init" in result.stderr
    assert "Traceback" not in result.stderr


def test_sc_killed_mid_training_resumes_to_the_same_weights(sft1, train_data, tmp_path):
    steps = 8
    small = ("--init", str(sft1), "--batch-size", "4", "--sc-samples", "2")
    killed_and_rerun_matches_whole(
        lambda out: _train_command(train_data, out, steps, "sc", *small), tmp_path, steps
    )
