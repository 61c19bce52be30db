"""occ train on the tiny preset with real trl trainers: every stage learns, resumes, and refuses bad input.

Run alone: ``.venv/bin/python -m pytest tests/integration/test_train.py``. Each trainer run is a few
seconds on one CPU core (tiny InternVL, 20 frames).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from occ_core.train.checkpoint import CARD, CHECKPOINTS, COMPLETE_MARK
from occ_core.train.config import TrainConfig
from occ_core.train.run import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]
OCC = [sys.executable, "-m", "occ_core.cli"]
QUICK = {"max_steps": 8, "save_steps": 4, "logging_steps": 1, "device": "cpu"}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _base_weights() -> dict[str, torch.Tensor]:
    from occ_core.train.tiny import VISION_ASSET, build_tiny

    model, _ = build_tiny(VISION_ASSET, seed=0)
    # Saved checkpoints name the modules without the in-memory "model." wrapper.
    return {k.removeprefix("model."): v.detach().clone() for k, v in model.state_dict().items()}


# The tiny preset freezes its tower in every stage (presets.TINY.vision).
TOWER = ("vision_tower.",)


def _assert_learned(
    card: dict, before: dict[str, torch.Tensor], after_dir: Path, frozen: tuple[str, ...] = TOWER
) -> None:
    assert card["metrics"]["last_loss"] < card["metrics"]["first_loss"], card["metrics"]
    after = _weights(after_dir)
    same = {n for n, v in after.items() if n in before and torch.equal(v, before[n].to(v.dtype))}
    unchanged = sorted(n for n in same if not n.startswith(frozen))
    assert not unchanged, f"trainable parameters that did not change: {unchanged[:5]}"
    moved = sorted(n for n in after if n in before and n.startswith(frozen) and n not in same)
    assert not moved, f"frozen parameters that changed: {moved[:5]}"
    assert any(n.startswith(frozen) for n in same), "no frozen parameter was compared"


@pytest.fixture(scope="module")
def stages(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SFT1 -> SFT2 -> MPO on the fixture data, each stage from the previous one's output."""
    root = tmp_path_factory.mktemp("stages")
    outs = {}
    init = None
    for stage in ("sft1", "sft2", "mpo"):
        outs[stage] = root / stage
        card = train(TrainConfig(stage=stage, data=train_data, init=init, out=outs[stage], **QUICK))
        assert not card["cached"]
        init = outs[stage]
    return outs


def test_sft1_loss_falls_and_every_trainable_parameter_changes(stages):
    card = json.loads((stages["sft1"] / CARD).read_text())
    _assert_learned(card, _base_weights(), stages["sft1"])


def test_sft2_trains_the_q1_answer_and_the_clarity_answer(stages, train_data):
    from occ_core.train import data
    from occ_core.train.processor import load_processor

    card = json.loads((stages["sft2"] / CARD).read_text())
    _assert_learned(card, _weights(stages["sft1"]), stages["sft2"])
    # Labels of one SFT2 row: both assistant turns, nothing of the prompt or the image.
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    processor = load_processor(stages["sft2"], image_seq_length=card["longest_tokens"])
    rows = data.to_dataset(data.load_sft(train_data, "sft2"))
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    batch = collator([dict(rows[0])])
    trained = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert trained.startswith("The object is ") and trained.endswith(("Yes.<|im_end|>", "No.<|im_end|>"))
    assert trained.count("<|im_end|>") == 2 and "<IMG_CONTEXT>" not in trained


def test_mpo_loss_falls_and_every_trainable_parameter_changes(stages):
    card = json.loads((stages["mpo"] / CARD).read_text())
    _assert_learned(card, _weights(stages["sft2"]), stages["mpo"])
    metrics = [json.loads(line) for line in (stages["mpo"] / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/margins" in m and "rewards/accuracies" in m for m in metrics)


def test_outputs_are_standard_hf_models_with_cards_and_metrics(stages):
    from transformers import AutoModelForImageTextToText

    for stage, out in stages.items():
        model = AutoModelForImageTextToText.from_pretrained(out)  # no occ code involved
        assert type(model).__name__ == "InternVLForConditionalGeneration"
        card = json.loads((out / CARD).read_text())
        assert (
            card["stage"] == stage and card["preset"] == "tiny" and card["final_step"] == QUICK["max_steps"]
        )
        assert {"data_fingerprint", "init_fingerprint", "settings", "code_version", "fingerprint"} <= set(
            card
        )
        assert (out / "loss_curve.png").stat().st_size > 0
        assert any((out / "tensorboard").glob("events.out.tfevents.*"))


def test_unchanged_rerun_trains_nothing(stages, train_data):
    card = train(TrainConfig(stage="sft1", data=train_data, out=stages["sft1"], **QUICK))
    assert card["cached"] is True


def test_an_out_of_another_run_is_refused(stages, train_data):
    from occ_core.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="other settings"):
        train(TrainConfig(stage="sft1", data=train_data, out=stages["sft1"], **{**QUICK, "seed": 3}))


# --- resume after SIGKILL -----------------------------------------------------------------------


def _train_command(data: Path, out: Path, steps: int, stage: str = "sft1", *extra: str) -> list[str]:
    return [
        *OCC,
        "train",
        "--stage",
        stage,
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--max-steps",
        str(steps),
        "--save-steps",
        "5",
        "--logging-steps",
        "5",
        *extra,
    ]


def killed_and_rerun_matches_whole(command: Callable[[Path], list[str]], root: Path, steps: int) -> None:
    """``command(out)`` run whole, and run again after a SIGKILL following its first complete checkpoint:
    the second resumes and ends at ``steps`` with the same weights as the whole run (within 1e-6)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, resumed = root / "whole", root / "resumed"
    subprocess.run(command(whole), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(
        command(resumed),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list((resumed / CHECKPOINTS).glob(f"checkpoint-*/{COMPLETE_MARK}")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / CARD).exists()

    subprocess.run(command(resumed), check=True, env=env, capture_output=True)
    card = json.loads((resumed / CARD).read_text())
    assert card["resumed_from"] is not None and card["final_step"] == steps
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"


def test_a_run_killed_mid_training_resumes_to_the_same_weights(train_data, tmp_path):
    steps = 40
    killed_and_rerun_matches_whole(lambda out: _train_command(train_data, out, steps), tmp_path, steps)


# --- bad input: a clear error naming the file or sample, before any training step ----------------


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*OCC, "train", *args], capture_output=True, text=True, env=env or dict(os.environ))


def _copy_data(train_data: Path, tmp_path: Path, images: bool = False) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(train_data, copy)
    return copy


def _repoint_images(data: Path, name: str, root: Path) -> None:
    meta = data / f"{name}.meta.json"
    content = json.loads(meta.read_text())
    content[name]["root"] = str(root)
    meta.write_text(json.dumps(content))


def test_a_missing_image_is_named_before_training(train_data, tmp_path):
    data = _copy_data(train_data, tmp_path)
    images = tmp_path / "images"
    source = Path(json.loads((data / "sft1.meta.json").read_text())["sft1"]["root"])
    shutil.copytree(source, images)
    first = json.loads((data / "sft1.jsonl").read_text().splitlines()[0])
    (images / first["image"]).unlink()
    _repoint_images(data, "sft1", images)
    out = tmp_path / "out"
    result = _run_cli("--stage", "sft1", "--data", str(data), "--out", str(out), "--device", "cpu")
    assert result.returncode == 1
    assert f"sample {first['id']}" in result.stderr and "missing image" in result.stderr
    assert "Traceback" not in result.stderr and not (out / CHECKPOINTS).exists()


def test_a_sample_longer_than_max_length_is_named(train_data, tmp_path):
    out = tmp_path / "out"
    result = _run_cli("--stage", "sft1", "--data", str(train_data), "--out", str(out), "--max-length", "20")
    assert result.returncode == 1 and "over max_length 20" in result.stderr and "sample " in result.stderr
    assert not (out / CHECKPOINTS).exists()


def test_a_clarity_set_with_one_label_is_refused(train_data, tmp_path):
    data = _copy_data(train_data, tmp_path)
    lines = (data / "sft2.jsonl").read_text().replace('"No."', '"Yes."')
    (data / "sft2.jsonl").write_text(lines)
    result = _run_cli(
        "--stage", "sft2", "--data", str(data), "--init", str(tmp_path), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 1
    assert "only one clarity label" in result.stderr and "sft2.jsonl" in result.stderr


def test_a_truncated_checkpoint_is_refused_as_init(stages, train_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(stages["sft1"], broken, ignore=shutil.ignore_patterns(CHECKPOINTS))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (broken / CARD).unlink()
    out = tmp_path / "out"
    result = _run_cli("--stage", "sft2", "--data", str(train_data), "--init", str(broken), "--out", str(out))
    assert result.returncode == 1 and "model.safetensors" in result.stderr and "truncated" in result.stderr
    assert not out.exists()


def test_a_half_written_output_is_refused_as_init(stages, train_data, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(stages["sft1"], half)
    (half / CARD).unlink()  # killed before the card: looks like a model, is not finished
    result = _run_cli(
        "--stage", "sft2", "--data", str(train_data), "--init", str(half), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 1 and "incomplete training output" in result.stderr


def test_an_absent_preset_directory_says_what_to_put_there(train_data, tmp_path):
    env = {**os.environ, "OCC_MODELS": str(tmp_path / "models")}
    result = _run_cli(
        "--stage",
        "sft1",
        "--preset",
        "internvl-1b",
        "--data",
        str(train_data),
        "--out",
        str(tmp_path / "o"),
        env=env,
    )
    assert result.returncode == 1
    assert str(tmp_path / "models" / "internvl-1b") in result.stderr and "InternVL" in result.stderr


def test_occ_train_stage_vision_runs_the_towers_own_command(tiny_obman, tmp_path):
    out = tmp_path / "tower"
    result = _run_cli(
        "--stage",
        "vision",
        "--data",
        str(tiny_obman),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--max-steps",
        "2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "config.json").is_file() and (out / "occ_card.json").is_file()
