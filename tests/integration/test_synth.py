"""The synthetic ObMan, rendered for real (pyrender offscreen), read back through occ_core.obman.

.venv/bin/python -m pytest tests/integration/test_synth.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from click.testing import CliRunner
from scipy.ndimage import binary_dilation
from scipy.spatial import cKDTree

from occ_core import obman
from occ_core.classes import QA_CLASSES
from occ_core.cli import main as occ
from occ_core.errors import StageError
from occ_core.synth import SynthConfig, generate
from tests.fixtures.obman import TINY_OBMAN_FRAMES, TINY_OBMAN_SPLITS

pytestmark = pytest.mark.integration


def frames(root: Path):
    """(ref, meta) of every frame of every split under root."""
    for split in TINY_OBMAN_SPLITS:
        for ref in obman.list_samples(root, split):
            yield ref, obman.load_meta(ref.meta_path)


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "synth_info.json"
    }


def test_each_split_holds_n_frames_in_obmans_folders(tiny_obman):
    for split in TINY_OBMAN_SPLITS:
        refs = obman.list_samples(tiny_obman, split)
        assert len(refs) == TINY_OBMAN_FRAMES
        for ref in refs:
            for path in (ref.rgb_path, ref.rgb_obj_path, ref.segm_path, ref.depth_path, ref.meta_path):
                assert path.is_file(), path


def test_every_frame_reads_back_at_256_pixels(tiny_obman):
    for ref, meta in frames(tiny_obman):
        assert obman.read_rgb(ref.rgb_path).shape == (256, 256, 3)
        assert obman.read_rgb(ref.rgb_obj_path).shape == (256, 256, 3)
        assert obman.read_segm(ref.segm_path).shape == (256, 256, 3)
        assert obman.read_depth(ref.depth_path, meta, "writer").shape == (256, 256, 3)
        assert obman.qa_class(meta, ref.meta_path) in QA_CLASSES


def test_the_conventions_are_recorded_in_meta_and_synth_info(tiny_obman):
    info = json.loads((tiny_obman / "synth_info.json").read_text())
    assert (info["depth_convention"], info["depth_kind"]) == ("writer", "radial")
    assert info["complete"] and info["K"] == obman.K.tolist()
    for _, meta in frames(tiny_obman):
        assert (meta["depth_convention"], meta["depth_kind"]) == ("writer", "radial")


def test_ids_are_8_digit_sorted_and_sparse(tiny_obman):
    gaps = 0
    for split in TINY_OBMAN_SPLITS:
        numbers = [int(ref.sample_id) for ref in obman.list_samples(tiny_obman, split)]
        assert all(len(ref.sample_id) == 8 for ref in obman.list_samples(tiny_obman, split))
        assert numbers == sorted(set(numbers))
        gaps += numbers[-1] + 1 - len(numbers)
    assert gaps > 0


def test_visibility_is_between_0_4_and_1_and_measured_on_the_masks(tiny_obman):
    for ref, meta in frames(tiny_obman):
        segm = obman.read_segm(ref.segm_path)
        visible = (segm[..., 0] == obman.OBJECT_LABEL).sum() / (segm[..., 2] == obman.OBJECT_LABEL).sum()
        assert 0.4 <= meta["obj_visibility_ratio"] <= 1.0
        assert meta["obj_visibility_ratio"] == pytest.approx(visible)


def test_segm_labels_are_obmans_per_channel(tiny_obman):
    seen = set()
    for ref, _ in frames(tiny_obman):
        segm = obman.read_segm(ref.segm_path)
        assert set(np.unique(segm[..., 0])) <= {0, 20, 22, 24, 100}
        assert set(np.unique(segm[..., 1])) <= {0, 20, 22, 24}
        assert set(np.unique(segm[..., 2])) <= {0, 100}
        # the visible object is part of the amodal silhouette
        assert not ((segm[..., 0] == 100) & (segm[..., 2] != 100)).any()
        seen |= set(np.unique(segm[..., 1]))
    assert {22, 24} <= seen


def test_depth_is_background_exactly_where_segm_is(tiny_obman):
    for ref, meta in frames(tiny_obman):
        segm, depth = obman.read_segm(ref.segm_path), obman.read_depth(ref.depth_path, meta, "writer")
        for channel in range(3):
            np.testing.assert_array_equal(np.isnan(depth[..., channel]), segm[..., channel] == 0)
        visible_object = segm[..., 0] == obman.OBJECT_LABEL
        step = (meta["depth_max"] - meta["depth_min"]) / 254 + (
            meta["obj_depth_max"] - meta["obj_depth_min"]
        ) / 254
        assert np.abs(depth[..., 0] - depth[..., 2])[visible_object].max() <= step


def _mesh_in_camera(root: Path, meta: dict) -> trimesh.Trimesh:
    mesh = trimesh.load(obman.resolve_mesh_path(meta, root), process=False, force="mesh")
    mesh.apply_transform(obman.object_to_camera(meta))
    return mesh


def test_the_mesh_projected_with_affine_transform_and_k_lands_in_segm_channel_2(tiny_obman):
    for ref, meta in frames(tiny_obman):
        vertices = _mesh_in_camera(tiny_obman, meta).vertices
        uv = vertices @ obman.K.T
        uv = uv[:, :2] / uv[:, 2:]
        columns, rows = np.floor(uv).astype(int).T  # Blender's grid: pixel i spans [i, i + 1)
        assert ((0 <= columns) & (columns < 256) & (0 <= rows) & (rows < 256)).all()
        # silhouette vertices may sit on a pixel whose centre the triangle misses: allow one pixel
        silhouette = binary_dilation(obman.read_segm(ref.segm_path)[..., 2] == obman.OBJECT_LABEL)
        assert silhouette[rows, columns].all(), ref.sample_id


def test_object_depth_backprojects_onto_the_mesh_surface(tiny_obman):
    for ref, meta in frames(tiny_obman):
        depth = obman.read_depth(ref.depth_path, meta, "writer")[..., 2]
        points = obman.backproject(depth, np.isfinite(depth), depth_kind=meta["depth_kind"])
        surface, _ = trimesh.sample.sample_surface(_mesh_in_camera(tiny_obman, meta), 100_000, seed=0)
        distance, _ = cKDTree(surface).query(points)
        quantum = (meta["obj_depth_max"] - meta["obj_depth_min"]) / 254
        assert np.median(distance) < quantum + 0.001, ref.sample_id


def test_hand_joints_in_coords_2d_are_the_projection_of_coords_3d(tiny_obman):
    for _, meta in frames(tiny_obman):
        camera = meta["coords_3d"].astype(np.float64) @ obman.CAM_EXTR.T
        uv = camera @ obman.K.T
        np.testing.assert_allclose(meta["coords_2d"], uv[:, :2] / uv[:, 2:], atol=1e-3)
        assert meta["side"] == "right" and meta["verts_3d"].dtype == np.float32


def test_obj_path_is_authors_style_and_the_dataset_holds_exactly_the_meshes_it_uses(tiny_obman):
    used = set()
    for _, meta in frames(tiny_obman):
        assert meta["obj_path"] == (
            f"/synthetic/ShapeNetCore.v2/{meta['class_id']}/{meta['sample_id']}/models/model_normalized.obj"
        )
        used.add(obman.resolve_mesh_path(meta, tiny_obman))
    assert set((tiny_obman / "shapenet").rglob("*.obj")) == used


def test_meshes_carry_their_colours_as_vertex_colours(tiny_obman):
    path = next(iter((tiny_obman / "shapenet").rglob("model_normalized.obj")))
    mesh = trimesh.load(path, process=False, force="mesh")
    assert mesh.visual.kind == "vertex"
    assert len(np.unique(mesh.visual.vertex_colors[:, :3], axis=0)) > 1
    assert np.linalg.norm(mesh.extents) == pytest.approx(1.0, abs=1e-3)


def test_the_same_seed_gives_the_same_bytes_whatever_the_process_count(tiny_obman, tmp_path):
    cfg = SynthConfig(out=tmp_path, n=TINY_OBMAN_FRAMES, seed=0, splits=TINY_OBMAN_SPLITS)
    generate(cfg, processes=2)
    expected, got = files_under(tiny_obman), files_under(tmp_path)
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []


def test_another_seed_gives_other_frames(tiny_obman, tmp_path):
    generate(SynthConfig(out=tmp_path, n=1, seed=1, splits=("test",)), processes=1)
    ref = obman.list_samples(tmp_path, "test")[0]
    assert ref.segm_path.read_bytes() != (tiny_obman / "test" / "segm" / ref.segm_path.name).read_bytes()


def test_a_rerun_is_a_no_op_and_other_parameters_are_refused(tiny_obman):
    cfg = SynthConfig(out=tiny_obman, n=TINY_OBMAN_FRAMES, seed=0, splits=TINY_OBMAN_SPLITS)
    before = {p: p.stat().st_mtime_ns for p in tiny_obman.rglob("*") if p.is_file()}
    report = generate(cfg, processes=1)
    assert (report.ok, report.skipped) == (0, TINY_OBMAN_FRAMES * len(TINY_OBMAN_SPLITS))
    with pytest.raises(StageError, match="other parameters"):
        generate(cfg.model_copy(update={"seed": 1}), processes=1)
    assert {p: p.stat().st_mtime_ns for p in tiny_obman.rglob("*") if p.is_file()} == before


def test_occ_synth_command_line_writes_the_dataset_with_the_given_class_weights(tmp_path):
    args = ["synth", "--out", str(tmp_path), "--n", "2", "--seed", "3", "--splits", "val"]
    result = CliRunner().invoke(occ, [*args, "--processes", "1", "--class-weights", "knife=1"])
    assert result.exit_code == 0, result.output
    assert "ok=2" in result.output and "val:" in result.output
    metas = [obman.load_meta(ref.meta_path) for ref in obman.list_samples(tmp_path, "val")]
    assert [obman.qa_class(m) for m in metas] == ["knife", "knife"]
    assert not (tmp_path / "train").exists()


def test_a_bad_class_weight_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(occ, ["synth", "--out", str(tmp_path), "--class-weights", "mug=1"])
    assert result.exit_code == 2 and "unknown classes ['mug']" in result.output


def test_generation_works_with_osmesa(tmp_path):
    env = os.environ | {"PYOPENGL_PLATFORM": "osmesa"}
    command = [sys.executable, "-m", "occ_core.synth", "--out", str(tmp_path), "--n", "1", "--splits", "test"]
    done = subprocess.run(
        [*command, "--processes", "1"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    ref = obman.list_samples(tmp_path, "test")[0]
    assert obman.read_segm(ref.segm_path)[..., 2].max() == obman.OBJECT_LABEL
