"""The parts of the synthetic ObMan generator that need no renderer: ids, seeds, config, placement.

.venv/bin/python -m pytest tests/unit/test_synth.py -q
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from occ_core import obman, synth
from occ_core.classes import class_priors


def config(**overrides) -> synth.SynthConfig:
    return synth.SynthConfig(out=Path("/nowhere"), **overrides)


def test_ids_are_8_digit_increasing_and_sparse():
    ids = list(islice(synth.frame_ids(config(id_gap_probability=0.3), "train"), 200))
    assert all(len(i) == 8 and i.isdigit() for i in ids)
    numbers = [int(i) for i in ids]
    assert all(b > a for a, b in zip(numbers, numbers[1:], strict=False))
    assert numbers[-1] > len(numbers) - 1, "no id was skipped"


def test_without_gaps_the_ids_count_from_zero():
    ids = list(islice(synth.frame_ids(config(id_gap_probability=0.0), "test"), 5))
    assert ids == ["00000000", "00000001", "00000002", "00000003", "00000004"]


def test_id_sequences_depend_on_seed_and_split_only():
    def first(cfg, split):
        return list(islice(synth.frame_ids(cfg, split), 50))

    assert first(config(seed=1), "train") == first(config(seed=1, n=99), "train")
    assert first(config(seed=1), "train") != first(config(seed=2), "train")
    assert first(config(seed=1), "train") != first(config(seed=1), "val")


def test_each_attempt_has_its_own_reproducible_generator():
    draw = synth.frame_rng(0, "train", 7).random(3)
    np.testing.assert_array_equal(draw, synth.frame_rng(0, "train", 7).random(3))
    assert not np.array_equal(draw, synth.frame_rng(0, "train", 8).random(3))
    assert not np.array_equal(draw, synth.frame_rng(0, "test", 7).random(3))


def test_default_class_weights_are_the_10k_priors():
    assert config().class_weights == class_priors()


def test_content_params_leave_out_the_output_folder():
    params = config(n=3).content_params()
    assert "out" not in params and params["n"] == 3
    assert synth.SynthConfig(out=Path("/elsewhere"), **params).content_params() == params


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"splits": ("train", "../dev")}, "split must be a name"),
        ({"splits": ()}, "splits must name at least one split"),
        ({"class_weights": {"mug": 1.0}}, "unknown classes ['mug']"),
        ({"class_weights": {"jar": -1.0, "can": 2.0}}, "must be >= 0 with a positive sum"),
        ({"class_weights": {"jar": 0.0}}, "must be >= 0 with a positive sum"),
        ({"n": 0}, "greater than or equal to 1"),
    ],
)
def test_a_bad_config_names_the_field_and_value(overrides, message):
    with pytest.raises(ValidationError) as info:
        config(**overrides)
    assert message in str(info.value)


def test_the_config_is_frozen():
    with pytest.raises(ValidationError):
        config().n = 3


def test_object_poses_sit_half_a_metre_to_0_8_m_down_minus_z_with_the_class_size():
    rng = np.random.default_rng(0)
    for _ in range(50):
        affine = synth.object_pose("bottle", rng)
        assert affine.dtype == np.float32
        assert -0.8 <= affine[2, 3] <= -0.5
        scale = np.linalg.norm(affine[:3, :3], axis=0)
        np.testing.assert_allclose(scale, scale[0], rtol=1e-5)  # rotation times one scale
        assert 0.85 * 0.26 <= scale[0] <= 1.15 * 0.26


def test_project_puts_the_optical_axis_at_the_principal_point():
    points = np.array([[0.0, 0.0, -0.6], [0.06, 0.03, -0.6]])  # Blender: y up, looking down -z
    np.testing.assert_allclose(synth.project(points), [[128, 128], [128 + 48, 128 - 24]])


def square(top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((256, 256), bool)
    mask[top : top + side, left : left + side] = True
    return mask


@pytest.mark.parametrize("cover", [0.1, 0.5, 0.8])
def test_the_occluding_shift_covers_the_wanted_share(cover):
    object_mask, hand_mask = square(100, 100, 40), square(90, 90, 60)
    du, dv = synth.occluding_shift(object_mask, hand_mask, cover, angle=0.0)
    assert dv == 0.0
    moved = np.roll(hand_mask, int(round(du)), axis=1)
    assert (object_mask & moved).sum() / object_mask.sum() == pytest.approx(cover, abs=0.05)


def test_a_hand_too_small_to_cover_that_much_stays_centred():
    du, dv = synth.occluding_shift(square(100, 100, 60), square(120, 120, 10), 0.9, angle=1.0)
    assert (du, dv) == (0.0, 0.0)


def test_backgrounds_are_reproducible_images():
    a = synth.background(np.random.default_rng(5))
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synth.background(np.random.default_rng(5)))
    assert a.std() > 5


def test_mesh_files_follow_shapenets_layout():
    path = synth.mesh_file(Path("/data"), "02876657", "abc")
    assert path == Path("/data/shapenet/02876657/abc/models/model_normalized.obj")


def test_depth_conventions_match_the_readers_options():
    assert synth.DEPTH_CONVENTION in obman.DEPTH_CONVENTIONS and synth.DEPTH_KIND in obman.DEPTH_KINDS


def test_synthesis_takes_every_core_by_default_and_its_own_setting(monkeypatch, tmp_path):
    import os

    from occ_core.config import Settings, get_settings

    assert Settings().synth_processes == (os.cpu_count() or 1)
    assert Settings().processes == max(1, (os.cpu_count() or 1) // 2)  # the render stage keeps half
    seen = {}

    def runner(cfg, processes):
        seen["processes"] = processes
        raise RuntimeError("stop before any frame")

    monkeypatch.setattr(synth, "attempt_runner", runner)
    monkeypatch.setenv("OCC_SYNTH_PROCESSES", "3")
    get_settings.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="stop before"):
            synth.generate(synth.SynthConfig(out=tmp_path / "root", n=1))
    finally:
        get_settings.cache_clear()
    assert seen == {"processes": 3}
