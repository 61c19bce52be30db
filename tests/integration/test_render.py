"""Real offscreen pyrender (EGL or OSMesa on llvmpipe): pixels where the projection says, jobs, quarantine.

.venv/bin/python -m pytest tests/integration/test_render.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
from click.testing import CliRunner
from PIL import Image, ImageDraw
from scipy.ndimage import binary_dilation, binary_erosion
from scipy.spatial import ConvexHull

from occ_core.render import (
    RenderConfig,
    RenderJob,
    cli,
    contact_sheet,
    get_renderer,
    intrinsics,
    render_jobs,
    sheet_rows,
    view_filename,
)

pytestmark = pytest.mark.integration

SIZE = 96
CUBE_SIDE = 0.1
CUBE_RGB = (200, 60, 30)


def cube_pose() -> np.ndarray:
    """A cube turned so three faces show, 0.5 m in front of the camera and a little off-centre."""
    yaw, pitch = np.radians(35.0), np.radians(25.0)
    turn_y = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    turn_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    pose = np.eye(4)
    pose[:3, :3] = turn_x @ turn_y
    pose[:3, 3] = [0.03, -0.02, 0.5]
    return pose


def coloured_cube() -> trimesh.Trimesh:
    cube = trimesh.creation.box(extents=[CUBE_SIDE] * 3)
    cube.visual.vertex_colors = np.tile([*CUBE_RGB, 255], (len(cube.vertices), 1)).astype(np.uint8)
    return cube


def projected_mask(mesh: trimesh.Trimesh, obj_to_cam: np.ndarray, size: int) -> np.ndarray:
    """The silhouette of a convex mesh by projecting its vertices with K and filling their hull."""
    cam = mesh.vertices @ obj_to_cam[:3, :3].T + obj_to_cam[:3, 3]
    uvw = cam @ intrinsics(size).T
    uv = uvw[:, :2] / uvw[:, 2:]
    hull = uv[ConvexHull(uv).vertices]
    canvas = Image.new("L", (size, size), 0)
    # The renders follow Blender (ObMan's renderer): pixel (i, j) spans [i, i+1) x [j, j+1), so (cx, cy) =
    # (128, 128) is the image centre. PIL puts pixel centres at integer coordinates: shift by half a pixel.
    ImageDraw.Draw(canvas).polygon([(u - 0.5, v - 0.5) for u, v in hull], fill=1)
    return np.asarray(canvas).astype(bool)


@pytest.fixture(scope="module")
def cube_render():
    rgb, depth = get_renderer("pyrender").render(coloured_cube(), cube_pose(), intrinsics(SIZE), SIZE)
    return rgb, depth, projected_mask(coloured_cube(), cube_pose(), SIZE)


def test_cube_renders_where_the_projection_says(cube_render):
    rgb, _, expected = cube_render
    drawn = rgb.any(axis=2)
    iou = (drawn & expected).sum() / (drawn | expected).sum()
    assert iou >= 0.9, f"mask IoU {iou:.3f} against the analytic projection"


def test_background_is_black(cube_render):
    rgb, _, expected = cube_render
    assert not rgb[~binary_dilation(expected, iterations=2)].any()


def test_flat_shading_shows_the_vertex_colour(cube_render):
    rgb, _, expected = cube_render
    inside = rgb[binary_erosion(expected, iterations=2)]
    np.testing.assert_allclose(inside, np.broadcast_to(CUBE_RGB, inside.shape), atol=1)


def test_depth_is_finite_and_within_the_cube_inside(cube_render):
    _, depth, expected = cube_render
    inside = depth[binary_erosion(expected, iterations=2)]
    z = (coloured_cube().vertices @ cube_pose()[:3, :3].T + cube_pose()[:3, 3])[:, 2]
    assert np.isfinite(inside).all()
    assert inside.min() >= z.min() - 1e-3 and inside.max() <= z.max() + 1e-3


def test_depth_is_zero_on_the_background(cube_render):
    _, depth, expected = cube_render
    assert not depth[~binary_dilation(expected, iterations=2)].any()


@pytest.fixture
def cube_jobs(tmp_path) -> list[RenderJob]:
    mesh_path = tmp_path / "cube.ply"
    coloured_cube().export(mesh_path)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (256, 256), (90, 120, 150)).save(photo)
    return [RenderJob(f"0000000{i}", "test", mesh_path, cube_pose(), image_path=photo) for i in range(3)]


def written_views(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("*_obman_*_rgb_*.jpg.png"))


CFG = RenderConfig(size=SIZE, views=3, processes=1)


def test_render_jobs_writes_one_decodable_png_per_view(tmp_path, cube_jobs):
    report = render_jobs(cube_jobs, CFG, tmp_path / "out")
    assert (report.ok, report.failed, report.extra["views"]) == (3, 0, 3 * 4)
    names = [view_filename(job.sample_id, "test", v) for job in cube_jobs for v in range(4)]
    assert [p.name for p in written_views(tmp_path / "out")] == sorted(names)
    for path in written_views(tmp_path / "out"):
        with Image.open(path) as image:
            assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))


def test_render_jobs_reports_throughput(tmp_path, cube_jobs):
    assert render_jobs(cube_jobs, CFG, tmp_path / "out").extra["views_per_s"] > 0


def write_bad_mesh(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ply"
    if kind == "no_faces":
        trimesh.PointCloud(np.random.default_rng(0).random((10, 3))).export(path)
    elif kind == "nan_vertices":
        mesh = coloured_cube()
        mesh.vertices[0] = np.nan
        mesh.export(path)
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    return path  # "missing": never written


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("no_faces", "no faces"),
        ("nan_vertices", "non-finite"),
        ("zero_bytes", "cannot load"),
        ("missing", "cannot load"),
    ],
)
def test_bad_mesh_is_quarantined_and_the_rest_goes_on(tmp_path, cube_jobs, kind, reason):
    bad = RenderJob("00000099", "test", write_bad_mesh(tmp_path, kind), cube_pose())
    report = render_jobs([cube_jobs[0], bad, cube_jobs[1]], CFG, tmp_path / "out")
    assert (report.ok, report.failed) == (2, 1)
    (quarantined,) = report.quarantined
    assert (quarantined.sample_id, quarantined.path) == ("00000099", str(bad.mesh_path))
    assert reason in quarantined.reason
    assert not list((tmp_path / "out").glob("00000099_*"))


def test_mesh_behind_the_camera_is_quarantined(tmp_path, cube_jobs):
    behind = cube_pose()
    behind[2, 3] = -0.5
    job = RenderJob("00000098", "test", cube_jobs[0].mesh_path, behind)
    report = render_jobs([job], CFG, tmp_path / "out")
    assert "view 0 is empty" in report.quarantined[0].reason


def test_rerun_skips_jobs_whose_views_exist_and_rewrites_nothing(tmp_path, cube_jobs):
    out_dir = tmp_path / "out"
    render_jobs(cube_jobs, CFG, out_dir)
    before = {p: p.stat().st_mtime_ns for p in written_views(out_dir)}
    report = render_jobs(cube_jobs, CFG, out_dir)
    assert (report.ok, report.skipped, report.extra["views"]) == (0, 3, 0)
    assert {p: p.stat().st_mtime_ns for p in written_views(out_dir)} == before


def test_rerun_renders_a_job_with_a_missing_view_again(tmp_path, cube_jobs):
    out_dir = tmp_path / "out"
    render_jobs(cube_jobs, CFG, out_dir)
    (out_dir / view_filename(cube_jobs[1].sample_id, "test", 2)).unlink()
    report = render_jobs(cube_jobs, CFG, out_dir)
    assert (report.ok, report.skipped) == (1, 2)
    assert len(written_views(out_dir)) == 12


def test_no_temporary_files_are_left_behind(tmp_path, cube_jobs):
    render_jobs(cube_jobs, CFG, tmp_path / "out")
    assert not list((tmp_path / "out").glob(".*.tmp"))


@pytest.mark.slow
def test_renderer_processes_write_the_same_pixels_as_one_process(tmp_path, cube_jobs):
    render_jobs(cube_jobs, CFG, tmp_path / "one")
    report = render_jobs(cube_jobs, CFG.model_copy(update={"processes": 2}), tmp_path / "two")
    assert (report.ok, report.extra["views"]) == (3, 12)
    for path in written_views(tmp_path / "one"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "two" / path.name))
        )


def test_contact_sheet_has_one_row_per_sample_photo_first(tmp_path, cube_jobs):
    out_dir = tmp_path / "out"
    render_jobs(cube_jobs, CFG, out_dir)
    sheet = contact_sheet(sheet_rows(cube_jobs, CFG, out_dir, limit=2), tmp_path / "sheet.png", thumb=32)
    image = np.asarray(Image.open(sheet))
    assert image.shape == (2 * 36 + 4, 5 * 36 + 4, 3)
    np.testing.assert_array_equal(image[4 + 16, 4 + 16], (90, 120, 150))  # the photo's tile


def test_cli_renders_a_jobs_file_with_quarantine_and_contact_sheet(tmp_path, cube_jobs):
    jobs_file = tmp_path / "jobs.jsonl"
    rows = [
        {
            "sample_id": "00000001",
            "split": "test",
            "mesh_path": "cube.ply",
            "obj_to_cam": cube_pose().tolist(),
            "image_path": "photo.png",
        },
        {
            "sample_id": "00000002",
            "split": "test",
            "mesh_path": "gone.ply",
            "obj_to_cam": cube_pose().tolist(),
        },
    ]
    jobs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out_dir = tmp_path / "out"
    args = ["--jobs", jobs_file, "--out", out_dir, "--size", "64", "--views", "2", "--processes", "1"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] == 1
    assert (out_dir / "contact_sheet.png").exists()
    assert json.loads((out_dir / "quarantine.jsonl").read_text())["sample_id"] == "00000002"


def test_renderer_survives_another_renderer_being_deleted():
    renderer = get_renderer("pyrender")
    before, _ = renderer.render(coloured_cube(), cube_pose(), intrinsics(SIZE), SIZE)
    import pyrender  # after the first render, which chose the GL platform

    pyrender.OffscreenRenderer(SIZE, SIZE).delete()  # calls eglTerminate on the shared display
    after, _ = renderer.render(coloured_cube(), cube_pose(), intrinsics(SIZE), SIZE)
    np.testing.assert_array_equal(after, before)


def test_an_open_surface_shows_from_behind():
    # A reconstruction from one depth map is front-only; the orbit views behind it must still show it.
    square = trimesh.Trimesh(
        vertices=[[-0.05, -0.05, 0], [0.05, -0.05, 0], [0.05, 0.05, 0], [-0.05, 0.05, 0]],
        faces=[[0, 1, 2], [0, 2, 3]],
        vertex_colors=np.tile([*CUBE_RGB, 255], (4, 1)),
    )
    facing, behind = np.eye(4), np.diag([-1.0, 1.0, -1.0, 1.0])  # behind: turned half a turn about y
    for pose in (facing, behind):
        pose[2, 3] = 0.5
        rgb, _ = get_renderer("pyrender").render(square, pose, intrinsics(SIZE), SIZE)
        assert rgb.any(axis=2).sum() > 0.1 * SIZE * SIZE


def test_face_colours_render():
    cube = trimesh.creation.box(extents=[CUBE_SIDE] * 3)
    cube.visual.face_colors = np.tile([*CUBE_RGB, 255], (len(cube.faces), 1)).astype(np.uint8)
    rgb, _ = get_renderer("pyrender").render(cube, cube_pose(), intrinsics(SIZE), SIZE)
    inside = rgb[binary_erosion(projected_mask(cube, cube_pose(), SIZE), iterations=2)]
    np.testing.assert_allclose(inside, np.broadcast_to(CUBE_RGB, inside.shape), atol=1)
