"""benchmarks/sc_bound.py on the tiny preset: the arms are scored on what they claim to be.

Run alone: ``.venv/bin/python -m pytest tests/integration/test_sc_bound.py`` (a tiny SFT1 of 8 steps on the
20-frame fixture data, then both arms for 2 epochs on the same 20 rows).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sc_bound import bound
from occ_core.train.config import TrainConfig
from occ_core.train.data import load_sft
from occ_core.train.predict import evaluate_q1
from occ_core.train.run import train
from tests.integration.test_train import QUICK

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SETTINGS = {"epochs": 2, "batch_size": 8, "seed": 0, "preset": "tiny", "vision": "frozen"}


@pytest.fixture(scope="module")
def sft1(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bound") / "sft1"
    train(TrainConfig(stage="sft1", data=train_data, out=out, **QUICK))
    return out


def test_an_untrained_first_look_is_the_pinned_attempt_1_and_the_counts_add_up(sft1, train_data):
    # A learning rate of 1e-12 leaves the weights as they were: the first look then answers Q1 exactly as the
    # init does, so its accuracy is the pinned attempt 1's and no frame is right for one and not the other.
    report = bound(sft1, [train_data], train_data, "conversation", {**SETTINGS, "learning_rate": 1e-12})
    n = report["test_frames"]
    assert n == len(load_sft(train_data, "sft1").rows) == report["rows"]
    assert report["pinned_attempt1"] == evaluate_q1(sft1, load_sft(train_data, "sft1"), "tiny")["accuracy"]
    for epoch in report["epochs"]:
        first, second = epoch["first_look"], epoch["second_look"]
        assert first["accuracy"] == report["pinned_attempt1"]
        assert (first["fixed"], first["broken"]) == (0, 0)
        # Paired counts are differences of accuracies, frame by frame.
        net_fixed = second["fixed"] - second["broken"]
        assert round((second["accuracy"] - report["pinned_attempt1"]) * n) == net_fixed
        net_only = epoch["only_second_right"] - epoch["only_first_right"]
        assert round((second["accuracy"] - first["accuracy"]) * n) == net_only


def test_the_command_prints_one_line_an_epoch_and_writes_results(sft1, train_data, tmp_path):
    command = [sys.executable, "-m", "benchmarks.sc_bound", "--init", str(sft1), "--data", str(train_data)]
    options = ["--test", str(train_data), "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path)]
    result = subprocess.run([*command, *options], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("epoch") and lines[-1].split()[0] == "1"
    assert (tmp_path / "results.json").stat().st_size > 0
