"""The tiny vision tower: pre-training writes a stock HF tower with its card; the shipped one matches it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from transformers import InternVLVisionConfig, InternVLVisionModel

from occ_core.train import vision
from occ_core.train.tiny import VISION_ASSET


def test_pretrain_saves_a_stock_tower_and_its_card(tiny_obman: Path, tmp_path: Path) -> None:
    out = tmp_path / "tower"
    cfg = vision.VisionPretrainConfig(
        data=(tiny_obman,),
        eval_data=(tiny_obman,),
        eval_split="test",
        out=out,
        steps=2,
        batch_size=4,
        probe_frames=5,
        blob_probability=0.5,
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    )
    card = vision.pretrain_vision(cfg)

    tower = InternVLVisionModel.from_pretrained(out)
    assert tower.config.hidden_size == 32
    assert json.loads((out / vision.CARD_NAME).read_text()) == card
    assert card["fingerprint_sha256"] == vision.fingerprint(out)
    assert card["data"]["train_rgb_obj"] == card["data"]["held_out_rgb"] == 5
    assert set(card["held_out_accuracy"]) == {"rgb_obj", "rgb"}
    assert card["linear_probe"]["train_frames"] == 5
    assert card["command"].startswith("python -m occ_core.train.vision --data ")


TINY_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def test_max_seconds_lowers_the_steps_and_the_card_replays_them(
    tiny_obman: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock that moves 50 ms a reading, so the calibrated count is the same on any machine, however busy.
    readings = itertools.count()
    monkeypatch.setattr(vision, "time", SimpleNamespace(perf_counter=lambda: 0.05 * next(readings)))
    cfg = vision.VisionPretrainConfig(
        data=(tiny_obman,),
        out=tmp_path / "bounded",
        steps=100_000,
        max_seconds=0.5,
        batch_size=4,
        probe_frames=0,
        vision=TINY_SHAPE,
    )
    card = vision.pretrain_vision(cfg)

    run = card["steps"]["run"]
    assert 1 <= run < card["steps"]["requested"] == 100_000
    assert card["steps"]["max_seconds"] == 0.5 and "calibrated_step_ms" in card["steps"]
    assert f"--steps {run} " in card["command"] and "--max-seconds" not in card["command"]
    # The bounded run is the unbounded run of that many steps: same weights, same card command.
    replay = vision.pretrain_vision(cfg.model_copy(update={"steps": run, "max_seconds": None}))
    assert replay["fingerprint_sha256"] == card["fingerprint_sha256"]
    assert replay["steps"] == {"requested": run, "run": run, "max_seconds": None}


@pytest.mark.parametrize(
    ("budget", "spent", "step", "requested", "expected"),
    [
        (100.0, 10.0, 0.01, 100_000, 7650),  # 85% of the 90 s left
        (100.0, 10.0, 0.01, 5000, 5000),  # never more than asked for
        (1.0, 2.0, 0.01, 5000, 1),  # calibration ate the budget: one step, not none
    ],
)
def test_steps_within_uses_the_margin_of_the_time_left(budget, spent, step, requested, expected) -> None:
    assert vision.steps_within(budget, spent, step, requested) == expected


def test_card_names_the_synth_seeds(tiny_obman: Path, tmp_path: Path) -> None:
    seed = json.loads((tiny_obman / "synth_info.json").read_text())["params"]["seed"]
    cfg = vision.VisionPretrainConfig(
        data=(tiny_obman,), out=tmp_path / "t", steps=1, batch_size=4, probe_frames=0, vision=TINY_SHAPE
    )
    assert vision.pretrain_vision(cfg)["synth_seeds"] == {"train": [seed], "held_out": []}


def test_cli_max_seconds_must_be_positive(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        vision.vision_command,
        ["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--max-seconds", "0"],
    )
    assert result.exit_code == 2
    assert "max_seconds" in result.output and "Traceback" not in result.output


def test_shipped_tower_loads_and_matches_its_card() -> None:
    card = json.loads((VISION_ASSET / vision.CARD_NAME).read_text())
    assert vision.fingerprint(VISION_ASSET) == card["fingerprint_sha256"]
    tower = InternVLVisionModel.from_pretrained(VISION_ASSET)
    expected = InternVLVisionConfig(**vision.TINY_VISION_CONFIG)
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(tower.config, key) == getattr(expected, key), key
    side, patch = expected.image_size[0], expected.patch_size[0]
    assert (side // patch) % 2 == 0  # pixel shuffle at downsample 0.5 needs an even grid


def test_odd_patch_grid_is_refused(tmp_path: Path) -> None:
    cfg = vision.VisionPretrainConfig(data=(tmp_path,), out=tmp_path, vision={"image_size": [56, 56]})
    with pytest.raises(ValueError, match="even"):
        cfg.vision_config()


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--vision", "{not json"], "--vision"), (["--vision", '{"image_size": [72, 72]}'], "even")],
)
def test_cli_usage_errors_are_one_line(tmp_path: Path, args: list[str], option: str) -> None:
    result = CliRunner().invoke(
        vision.vision_command, ["--data", str(tmp_path), "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2
    assert option in result.output
    assert "Traceback" not in result.output


def test_hand_layers_paste_only_the_hand_of_another_frame(tiny_obman: Path, tmp_path: Path) -> None:
    from occ_core import obman

    pixels, coverage = vision.hand_layers([tiny_obman], "train", 64)
    samples = obman.list_samples(tiny_obman, "train")
    assert len(pixels) == len(coverage) == len(samples)
    assert 0 < coverage.float().mean() < 1  # some hand, not all of the frame

    x = vision.preprocess([s.rgb_obj_path for s in samples], 64)
    cfg = vision.VisionPretrainConfig(data=(tiny_obman,), out=tmp_path, augment="none", hand_probability=1.0)
    pasted = vision.augment(x, torch.Generator().manual_seed(0), cfg, (pixels, coverage))
    # Replay the frame choice: where a mask is 0 the object-only pixels stay, where it is 1 the hand's come.
    pick = torch.randint(0, len(pixels), (len(x),), generator=torch.Generator().manual_seed(0))
    alpha = coverage[pick].float()
    expected = x.float() * (1 - alpha) + pixels[pick].float() * alpha
    assert torch.allclose(pasted.float(), expected, atol=1e-2)
    assert not torch.equal(pasted, x)

    untouched = vision.augment(
        x, torch.Generator().manual_seed(0), cfg.model_copy(update={"hand_probability": 0.0})
    )
    assert torch.equal(untouched, x)


def test_hand_probability_is_in_the_card_command(tiny_obman: Path, tmp_path: Path) -> None:
    cfg = vision.VisionPretrainConfig(
        data=(tiny_obman,),
        out=tmp_path / "t",
        steps=1,
        batch_size=2,
        probe_frames=0,
        hand_probability=0.5,
        vision=TINY_SHAPE,
    )
    card = vision.pretrain_vision(cfg)
    assert "--hand-probability 0.5" in card["command"]
    assert card["data"]["hand_layers"] == card["data"]["train_rgb_obj"]
