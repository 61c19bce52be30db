"""Render geometry without a GL context: intrinsics, orbit poses, file names, PNG encoding, config.

.venv/bin/python -m pytest tests/unit/test_render_geometry.py -q
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from occ_core.errors import BadSample, StageError
from occ_core.render import (
    RenderConfig,
    RenderJob,
    encode_png,
    get_renderer,
    intrinsics,
    job_poses,
    orbit_poses,
    ring_azimuths,
    view_filename,
)


def pose_at(translation, yaw_deg: float = 0.0) -> np.ndarray:
    """An object-to-camera transform: a turn about the object's y axis, then a shift."""
    yaw = np.radians(yaw_deg)
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]]
    pose[:3, 3] = translation
    return pose


def project(K: np.ndarray, obj_to_cam: np.ndarray, point_obj) -> np.ndarray:
    point_cam = obj_to_cam[:3, :3] @ np.asarray(point_obj, dtype=float) + obj_to_cam[:3, 3]
    uvw = K @ point_cam
    return uvw[:2] / uvw[2]


INPUT = pose_at([0.06, -0.04, 0.65], yaw_deg=25.0)


def test_intrinsics_are_obman_at_256():
    np.testing.assert_array_equal(intrinsics(256), [[480, 0, 128], [0, 480, 128], [0, 0, 1]])


@pytest.mark.parametrize("size", [64, 128, 512])
def test_intrinsics_scale_focal_and_centre_with_size(size):
    np.testing.assert_allclose(intrinsics(size), np.diag([size / 256, size / 256, 1]) @ intrinsics(256))


def test_orbit_returns_view_0_plus_n():
    assert len(orbit_poses(INPUT, 8, (30.0, -30.0))) == 9


def test_view_0_is_the_input_pose():
    np.testing.assert_array_equal(orbit_poses(INPUT, 4)[0], INPUT)


def test_zero_orbit_views_gives_view_0_only():
    assert len(orbit_poses(INPUT, 0)) == 1


def test_orbit_cameras_keep_the_input_distance_to_the_centre():
    distances = [np.linalg.norm(pose[:3, 3]) for pose in orbit_poses(INPUT, 10, (30.0, -30.0, 0.0))]
    np.testing.assert_allclose(distances, np.linalg.norm(INPUT[:3, 3]))


def test_orbit_cameras_look_at_the_centre():
    K = intrinsics(256)
    for pose in orbit_poses(INPUT, 8)[1:]:
        np.testing.assert_allclose(project(K, pose, [0, 0, 0]), [128, 128], atol=1e-9)


def test_orbit_rotations_are_proper():
    for pose in orbit_poses(INPUT, 8):
        np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0)


def test_positive_elevation_puts_the_camera_above_the_object():
    level = pose_at([0.0, 0.0, 0.6])
    above = orbit_poses(level, 1, (30.0,))[1]
    camera_in_input_frame = level[:3, :3] @ np.linalg.inv(above)[:3, 3] + level[:3, 3]
    # OpenCV y points down, so "above" is negative y, at 30 degrees over the object at 0.6 m.
    assert camera_in_input_frame[1] == pytest.approx(-0.6 * np.sin(np.radians(30.0)))


def test_orbit_keeps_the_input_cameras_up():
    level = pose_at([0.0, 0.0, 0.6])
    for pose in orbit_poses(level, 6, (20.0, -20.0))[1:]:
        up_in_view = pose[:3, :3] @ level[:3, :3].T @ np.array([0.0, -1.0, 0.0])
        assert up_in_view[1] < 0  # still pointing up in the image


def test_views_are_shared_among_rings_and_spread_in_azimuth():
    angles = ring_azimuths(5, (30.0, -30.0))
    assert [e for e, _ in angles] == [30.0, 30.0, 30.0, -30.0, -30.0]
    assert [a for e, a in angles if e == 30.0] == pytest.approx([0.0, 120.0, 240.0])
    assert [a for e, a in angles if e == -30.0] == pytest.approx([90.0, 270.0])  # odd ring turned half a step


def test_object_at_the_camera_cannot_be_orbited():
    with pytest.raises(ValueError, match="cannot orbit"):
        orbit_poses(np.eye(4), 2)


def test_non_finite_pose_is_a_bad_sample():
    job = RenderJob("00000001", "test", "mesh.ply", np.full((4, 4), np.nan))
    with pytest.raises(BadSample, match="finite 4x4"):
        job_poses(job, RenderConfig(processes=1))


def test_view_filename_keeps_moho_naming():
    assert view_filename("00012345", "test", 0) == "00012345_0_obman_test_rgb_00012345.jpg.png"


def test_orbit_view_filename_carries_the_view_index():
    assert view_filename("00000007", "val", 3) == "00000007_3_obman_val_rgb_00000007.jpg.png"


def test_job_filenames_list_view_0_then_orbit_views():
    job = RenderJob("00000002", "train", "m.ply", INPUT)
    assert job.filenames(2) == [view_filename("00000002", "train", v) for v in range(3)]


@pytest.mark.parametrize("level", [0, 1, 9])
def test_encoded_png_decodes_to_the_same_pixels(level):
    rgb = np.random.default_rng(level).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(rgb, level)))
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), rgb)


def test_render_config_defaults_follow_moho():
    cfg = RenderConfig(processes=1)
    assert (cfg.size, cfg.views, cfg.elevations_deg, cfg.backend, cfg.png_level) == (
        256,
        8,
        (30.0, -30.0),
        "pyrender",
        1,
    )


def test_render_config_rejects_a_pole_elevation():
    with pytest.raises(ValidationError, match="elevations_deg"):
        RenderConfig(elevations_deg=(90.0,))


def test_cache_params_ignore_how_many_processes_render():
    assert (
        RenderConfig(processes=1).cache_params() == RenderConfig(processes=8, encode_threads=3).cache_params()
    )


def test_cache_params_follow_the_output_settings():
    assert RenderConfig(processes=1).cache_params() != RenderConfig(processes=1, size=512).cache_params()


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(StageError, match="pyrender"):
        get_renderer("pytorch3d")
