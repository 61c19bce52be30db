"""The depth and oracle backends on tiny_obman, through the real renderer: camera conventions, manifests,
bad input, and ``occ reconstruct`` / ``occ render`` end to end.

The IoU checks catch a wrong camera convention anywhere between the readers, the backends and the
renderer: the oracle's view 0 must match the object-only mask (segm channel 2), and the depth backend's
view 0 must cover the visible object (channel 0 == 100) and stay inside the object-only mask.

    .venv/bin/python -m pytest tests/integration/test_reconstruct.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from moho_bridge.cli import reconstruct as reconstruct_command
from moho_bridge.cli import render as render_command
from moho_bridge.pipeline import ReconstructParams, RenderParams, reconstruct, render_split
from occ_core import obman
from occ_core.fsio import sha256_file
from occ_core.render import get_renderer, intrinsics, load_mesh, view_filename

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def test_split(tiny_obman):
    return obman.list_samples(tiny_obman, "test")


@pytest.fixture(scope="module")
def reconstructed(tiny_obman, test_split, tmp_path_factory):
    """backend -> (out_dir, report, results) for the whole test split."""
    outputs = {}
    for backend in ("oracle", "depth"):
        out = tmp_path_factory.mktemp(backend)
        outputs[backend] = (
            out,
            *reconstruct(test_split, ReconstructParams(root=tiny_obman, backend=backend), out),
        )
    return outputs


def view0_masks(result, sample):
    """(drawn, visible, object-only) masks of one sample's view 0 rendered from its mesh."""
    _, depth = get_renderer("pyrender").render(
        load_mesh(result.mesh_path), result.pose(), intrinsics(256), 256
    )
    labels = obman.read_segm(sample.segm_path)
    return depth > 0, labels[:, :, 0] == obman.OBJECT_LABEL, labels[:, :, 2] == obman.OBJECT_LABEL


def test_every_sample_is_reconstructed_by_both_backends(reconstructed, test_split):
    assert [(b, report.ok, report.failed) for b, (_, report, _) in reconstructed.items()] == [
        ("oracle", len(test_split), 0),
        ("depth", len(test_split), 0),
    ]


def test_oracle_view0_matches_the_object_only_mask(reconstructed, test_split):
    _, _, results = reconstructed["oracle"]
    for result, sample in zip(results, test_split, strict=True):
        drawn, _, amodal = view0_masks(result, sample)
        iou = (drawn & amodal).sum() / (drawn | amodal).sum()
        assert iou >= 0.9, f"{sample.sample_id}: oracle view-0 IoU with segm channel 2 is {iou:.3f}"


def test_depth_view0_covers_the_visible_object(reconstructed, test_split):
    _, _, results = reconstructed["depth"]
    for result, sample in zip(results, test_split, strict=True):
        drawn, visible, _ = view0_masks(result, sample)
        coverage = (drawn & visible).sum() / visible.sum()
        assert coverage >= 0.9, (
            f"{sample.sample_id}: depth view 0 covers {coverage:.3f} of the visible object"
        )


def test_depth_view0_paints_inside_the_object_only(reconstructed, test_split):
    _, _, results = reconstructed["depth"]
    for result, sample in zip(results, test_split, strict=True):
        drawn, _, amodal = view0_masks(result, sample)
        inside = (drawn & amodal).sum() / drawn.sum()
        assert inside >= 0.9, f"{sample.sample_id}: {inside:.3f} of the depth view-0 pixels are on the object"


def test_oracle_mesh_is_the_ground_truth_mesh_in_its_own_frame(reconstructed, tiny_obman, test_split):
    _, _, results = reconstructed["oracle"]
    truth = load_mesh(obman.resolve_mesh_path(obman.load_meta(test_split[0].meta_path), tiny_obman))
    assert np.allclose(load_mesh(results[0].mesh_path).vertices, truth.vertices, atol=1e-6)


def test_depth_mesh_has_colours_from_the_photo(reconstructed):
    _, _, results = reconstructed["depth"]
    colours = load_mesh(results[0].mesh_path).visual.vertex_colors[:, :3]
    assert len(np.unique(colours, axis=0)) > 10


def test_manifest_has_one_row_per_sample_with_pose_and_hash(reconstructed, test_split):
    out, _, results = reconstructed["depth"]
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["id"] for r in rows] == [s.sample_id for s in test_split]
    assert all(r["status"] == "ok" and len(r["obj_to_cam"]) == 16 for r in rows)
    assert rows[0]["mesh_sha256"] == sha256_file(out / f"{test_split[0].sample_id}.ply")


@pytest.mark.parametrize(
    ("backend", "label"),
    [("depth", "geometric fallback from the depth map; not MOHO"), ("oracle", "upper bound")],
)
def test_manifest_labels_the_backend_honestly(reconstructed, backend, label):
    out, _, _ = reconstructed[backend]
    row = pq.read_table(out / "manifest.parquet").to_pylist()[0]
    assert row["backend"] == backend and label in json.loads(row["provenance"])["label"]


def test_depth_manifest_says_the_pose_is_ground_truth(reconstructed):
    out, _, _ = reconstructed["depth"]
    provenance = json.loads(pq.read_table(out / "manifest.parquet").to_pylist()[0]["provenance"])
    assert "ground-truth" in provenance["pose"] and "mirror" in provenance["completion"]


# --- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def damaged_copy(tiny_obman, tmp_path):
    """A private copy of tiny_obman's test split and meshes, free to damage."""
    root = tmp_path / "obman"
    shutil.copytree(tiny_obman / "test", root / "test")
    shutil.copytree(tiny_obman / "shapenet", root / "shapenet")
    return root


def run_depth(root: Path, out: Path, samples=None):
    samples = samples if samples is not None else obman.list_samples(root, "test")
    return reconstruct(samples, ReconstructParams(root=root, backend="depth"), out)


def test_malformed_meta_is_quarantined_and_the_rest_goes_on(damaged_copy, tmp_path):
    bad = obman.list_samples(damaged_copy, "test")[1]
    bad.meta_path.write_bytes(b"not a pickle")
    report, _ = run_depth(damaged_copy, tmp_path / "out")
    assert (report.failed, report.ok) == (1, len(obman.list_samples(damaged_copy, "test")) - 1)
    assert report.quarantined[0].path == str(bad.meta_path) and "meta pickle" in report.quarantined[0].reason


def test_missing_meta_is_quarantined(damaged_copy, tmp_path):
    samples = obman.list_samples(damaged_copy, "test")
    samples[0].meta_path.unlink()
    report, _ = run_depth(damaged_copy, tmp_path / "out", samples)
    assert report.quarantined[0].reason == "file is missing" and report.ok == len(samples) - 1


def test_missing_depth_map_is_quarantined(damaged_copy, tmp_path):
    bad = obman.list_samples(damaged_copy, "test")[0]
    bad.depth_path.unlink()
    report, _ = run_depth(damaged_copy, tmp_path / "out")
    assert (report.quarantined[0].path, report.quarantined[0].reason) == (
        str(bad.depth_path),
        "file is missing",
    )


def test_failed_sample_is_in_the_manifest_with_its_reason(damaged_copy, tmp_path):
    obman.list_samples(damaged_copy, "test")[0].depth_path.unlink()
    run_depth(damaged_copy, tmp_path / "out")
    row = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()[0]
    assert (row["status"], row["error"], row["obj_to_cam"]) == ("failed", "file is missing", None)


@pytest.mark.parametrize(
    ("obj_text", "reason"),
    [
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\n", "mesh has no faces"),
        ("v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n", "mesh has non-finite vertices"),
    ],
)
def test_unusable_ground_truth_mesh_is_quarantined(damaged_copy, tmp_path, obj_text, reason):
    samples = obman.list_samples(damaged_copy, "test")
    mesh_paths = [obman.resolve_mesh_path(obman.load_meta(s.meta_path), damaged_copy) for s in samples]
    mesh_paths[0].write_text(obj_text)
    report, _ = reconstruct(samples, ReconstructParams(root=damaged_copy, backend="oracle"), tmp_path / "out")
    assert report.failed == mesh_paths.count(mesh_paths[0])
    assert {(q.path, q.reason) for q in report.quarantined} == {(str(mesh_paths[0]), reason)}


def test_render_counts_a_bad_sample_and_renders_the_others(damaged_copy, tmp_path):
    samples = obman.list_samples(damaged_copy, "test")
    samples[0].depth_path.unlink()
    summary = render_split(RenderParams(root=damaged_copy, views=1, processes=1, out=tmp_path / "views"))
    assert (summary["rendered"], summary["failed"]) == (len(samples) - 1, 1)
    assert str(samples[0].depth_path) in summary["quarantined"][0]
    assert (
        json.loads((tmp_path / "views" / "quarantine.jsonl").read_text())["sample_id"] == samples[0].sample_id
    )


# --- the commands ---------------------------------------------------------------------------------


def test_occ_reconstruct_writes_meshes_and_manifest(tiny_obman, test_split, tmp_path):
    result = CliRunner().invoke(
        reconstruct_command,
        ["--root", str(tiny_obman), "--split", "test", "--backend", "depth", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in tmp_path.glob("*.ply")) == [s.sample_id for s in test_split]
    assert (tmp_path / "manifest.parquet").is_file() and json.loads(result.output)["ok"] == len(test_split)


def test_occ_render_goes_from_samples_to_views(tiny_obman, test_split, tmp_path):
    args = [
        "--root",
        str(tiny_obman),
        "--split",
        "test",
        "--backend",
        "oracle",
        "--views",
        "2",
        "--processes",
        "1",
    ]
    result = CliRunner().invoke(render_command, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    expected = {view_filename(s.sample_id, "test", v) for s in test_split for v in range(3)}
    assert {p.name for p in tmp_path.glob("*.png")} == expected | {"contact_sheet.png"}


def test_occ_render_again_renders_nothing_new(tiny_obman, test_split, tmp_path):
    args = [
        "--root",
        str(tiny_obman),
        "--backend",
        "oracle",
        "--views",
        "1",
        "--processes",
        "1",
        "--out",
        str(tmp_path),
    ]
    CliRunner().invoke(render_command, args)
    again = json.loads(CliRunner().invoke(render_command, args).output)
    assert (again["rendered"], again["skipped"], again["views"]) == (0, len(test_split), 0)


def test_occ_render_into_the_same_out_with_another_backend_renders_everything_again(
    tiny_obman, test_split, tmp_path
):
    def render(backend: str) -> dict:
        args = ["--root", str(tiny_obman), "--backend", backend, "--views", "1", "--processes", "1"]
        return json.loads(CliRunner().invoke(render_command, [*args, "--out", str(tmp_path)]).output)

    view0 = tmp_path / view_filename(test_split[0].sample_id, "test", 0)
    render("depth")
    depth_bytes = view0.read_bytes()
    oracle = render("oracle")
    assert (oracle["rendered"], oracle["skipped"]) == (len(test_split), 0)
    assert view0.read_bytes() != depth_bytes


def test_occ_render_without_out_writes_under_the_stage_key(tiny_obman, occ_home):
    result = CliRunner().invoke(
        render_command, ["--root", str(tiny_obman), "--views", "0", "--processes", "1"]
    )
    views_dir = Path(json.loads(result.output)["views_dir"])
    assert views_dir.parent == occ_home.resolve() / "render" and len(views_dir.name) == 16


def test_occ_render_orbit_elevations_are_a_flag(tiny_obman, test_split, tmp_path):
    def view1(elevations: str) -> bytes:
        out = tmp_path / elevations.replace(",", "_")
        args = ["--root", str(tiny_obman), "--backend", "oracle", "--views", "1", "--processes", "1"]
        CliRunner().invoke(render_command, [*args, "--elevations", elevations, "--out", str(out)])
        return (out / view_filename(test_split[0].sample_id, "test", 1)).read_bytes()

    assert view1("60") != view1("-60")
