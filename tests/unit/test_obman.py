"""ObMan readers: encodings, the restricted unpickler, meta validation, classes, meshes, back-projection.

.venv/bin/python -m pytest tests/unit/test_obman.py -q
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from occ_core import obman
from occ_core.classes import SYNSET_BY_CLASS
from occ_core.errors import BadSample
from tests.fixtures.obman import valid_meta


def write_png(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


def write_pickle(path: Path, obj: object, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# --- constants ------------------------------------------------------------------------------------


def test_intrinsics_and_extrinsics_are_obmans():
    assert obman.K.tolist() == [[480, 0, 128], [0, 480, 128], [0, 0, 1]]
    assert obman.CAM_EXTR.tolist() == [[1, 0, 0], [0, -1, 0], [0, 0, -1]]


# --- listing --------------------------------------------------------------------------------------


def test_list_samples_enumerates_meta_pickles_sorted_with_their_paths(tmp_path):
    meta_dir = tmp_path / "test" / "meta"
    meta_dir.mkdir(parents=True)
    for sample_id in ("00000007", "00000000", "00000003"):
        (meta_dir / f"{sample_id}.pkl").write_bytes(b"")
    refs = obman.list_samples(tmp_path, "test")
    assert [r.sample_id for r in refs] == ["00000000", "00000003", "00000007"]
    assert refs[0].rgb_path == tmp_path / "test" / "rgb" / "00000000.jpg"
    assert refs[0].rgb_obj_path == tmp_path / "test" / "rgb_obj" / "00000000.jpg"
    assert refs[0].segm_path == tmp_path / "test" / "segm" / "00000000.png"
    assert refs[0].depth_path == tmp_path / "test" / "depth" / "00000000.png"
    assert refs[0].meta_path == meta_dir / "00000000.pkl"


def test_list_samples_is_the_union_of_the_sample_folders(tmp_path):
    files = {"rgb/00000001.jpg", "segm/00000002.png", "depth/00000003.png", "rgb_obj/00000004.jpg"}
    files |= {"meta/00000005.pkl", "rgb/00000005.jpg", "rgb/._00000006.jpg", "rgb/notes.txt"}
    for name in files:
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / name).write_bytes(b"")
    ids = [r.sample_id for r in obman.list_samples(tmp_path, "train")]
    assert ids == ["00000001", "00000002", "00000003", "00000004", "00000005"]


def test_list_samples_of_a_missing_split_is_empty(tmp_path):
    assert obman.list_samples(tmp_path, "val") == []


# --- segm -----------------------------------------------------------------------------------------


def test_segm_channels_come_back_in_opencv_order(tmp_path):
    full, hand, obj = (np.full((4, 5), v, np.uint8) for v in (22, 24, 100))
    # OpenCV reads BGR: the file's RGB order is (object, hand, full).
    path = write_png(tmp_path / "s.png", np.stack([obj, hand, full], axis=-1))
    segm = obman.read_segm(path)
    assert segm.shape == (4, 5, 3) and segm.dtype == np.uint8
    assert (segm[..., 0] == 22).all() and (segm[..., 1] == 24).all() and (segm[..., 2] == 100).all()


# --- depth ----------------------------------------------------------------------------------------


def test_encode_then_decode_depth_round_trips_within_one_step():
    depth = np.array([[np.nan, 0.5], [0.6, 0.75]], np.float32)
    encoded, d_min, d_max = obman.encode_depth(depth)
    assert encoded.tolist() == [[0, 1], [int(np.rint(1 + 254 * 0.4)), 255]]
    decoded = obman.decode_depth(encoded, d_min, d_max, "writer")
    assert np.isnan(decoded[0, 0])
    np.testing.assert_allclose(decoded[1:, :], depth[1:, :], atol=(d_max - d_min) / 254)
    np.testing.assert_allclose(decoded[0, 1], 0.5)


def test_reader_convention_mirrors_the_writer_convention():
    encoded = np.array([[0, 1, 128, 255]], np.uint8)
    writer = obman.decode_depth(encoded, 0.5, 0.7, "writer")
    reader = obman.decode_depth(encoded, 0.5, 0.7, "reader")
    np.testing.assert_allclose(writer[0, 1:], [0.5, 0.5 + 0.2 * 127 / 254, 0.7], rtol=1e-6)
    np.testing.assert_allclose(reader[0, 1:], 1.2 - writer[0, 1:], rtol=1e-6)
    assert np.isnan(reader[0, 0])


def test_an_empty_depth_channel_encodes_as_background_with_a_zero_range():
    encoded, d_min, d_max = obman.encode_depth(np.full((2, 2), np.nan, np.float32))
    assert (encoded == 0).all() and (d_min, d_max) == (0.0, 0.0)


def test_read_depth_decodes_each_channel_with_its_own_range(tmp_path):
    values = np.array([[0, 1, 255]], np.uint8)
    full, hand, obj = values, np.array([[255, 0, 1]], np.uint8), np.array([[1, 255, 0]], np.uint8)
    path = write_png(tmp_path / "d.png", np.stack([obj, hand, full], axis=-1))
    meta = valid_meta()
    depth = obman.read_depth(path, meta, "writer")
    assert depth.dtype == np.float32 and depth.shape == (1, 3, 3)
    np.testing.assert_allclose(depth[0, 1:, 0], [0.5, 0.7])
    np.testing.assert_allclose(depth[0, [0, 2], 1], [0.6, 0.45])
    np.testing.assert_allclose(depth[0, :2, 2], [0.55, 0.7])
    assert np.isnan(depth[0, 0, 0]) and np.isnan(depth[0, 1, 1]) and np.isnan(depth[0, 2, 2])


def test_read_depth_takes_the_convention_from_settings_by_default(tmp_path, monkeypatch):
    from occ_core.config import get_settings

    channel = np.array([[1]], np.uint8)
    path = write_png(tmp_path / "d.png", np.stack([channel] * 3, axis=-1))
    monkeypatch.setenv("OCC_DEPTH_CONVENTION", "reader")
    get_settings.cache_clear()
    try:
        assert obman.read_depth(path, valid_meta())[0, 0, 0] == pytest.approx(0.7)
    finally:
        get_settings.cache_clear()


# --- images ---------------------------------------------------------------------------------------


def test_read_rgb_returns_rgb_uint8(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (6, 4), (200, 10, 10)).save(path, quality=95)
    rgb = obman.read_rgb(path)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] > 150 and rgb[0, 0, 1] < 60


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _gray_png(path: Path) -> None:
    Image.new("L", (4, 4)).save(path, format="PNG")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: None, "file is missing"),
        (lambda p: p.write_bytes(b""), "not a readable image"),
        (lambda p: p.write_bytes(b"<html>not an image</html>"), "not a readable image"),
        (_truncated_jpeg, "truncated or corrupt"),
        (_gray_png, "expected 3-channel RGB"),
    ],
    ids=["missing", "empty", "not-an-image", "truncated", "grayscale"],
)
@pytest.mark.parametrize("reader", [obman.read_rgb, obman.read_segm], ids=["rgb", "segm"])
def test_a_bad_image_names_the_file_and_the_reason(tmp_path, reader, damage, reason):
    path = tmp_path / "00000042.jpg"
    damage(path)
    with pytest.raises(BadSample) as info:
        reader(path)
    assert info.value.path == str(path) and reason in info.value.reason


def test_a_bad_depth_png_names_the_file(tmp_path):
    path = tmp_path / "00000042.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(BadSample, match="00000042.png"):
        obman.read_depth(path, valid_meta(), "writer")


# --- the restricted unpickler ---------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "00000001.pkl", {"side": _RunsCommand(f"touch {marker}")})
    with pytest.raises(BadSample) as info:
        obman.load_meta(path)
    assert info.value.path == str(path)
    assert "forbidden global" in info.value.reason and "system" in info.value.reason
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        (eval, ("1 + 1",)),
        (getattr, (0, "real")),
        (Path, ("/etc/passwd",)),
        (np.load, ("x.npy",)),
    ],
    ids=["eval", "getattr", "pathlib", "numpy.load"],
)
def test_any_global_beyond_numpy_arrays_and_plain_values_is_refused(tmp_path, payload):
    class Reduces:
        def __reduce__(self):
            return payload

    path = write_pickle(tmp_path / "m.pkl", {"x": Reduces()})
    with pytest.raises(BadSample, match="forbidden global"):
        obman.restricted_loads(path.read_bytes(), path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_scalars_and_plain_values_load(tmp_path, protocol):
    value = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "scalar": np.float64(0.25),
        "zero_d": np.array(3, dtype=np.int64),
        "plain": [1, 2.5, "x", (True, None), {"set"}, b"raw"],
    }
    loaded = obman.restricted_loads(pickle.dumps(value, protocol=protocol), tmp_path / "m.pkl")
    np.testing.assert_array_equal(loaded["a"], value["a"])
    assert loaded["a"].dtype == np.float32
    assert loaded["scalar"] == 0.25 and int(loaded["zero_d"]) == 3
    assert loaded["plain"] == value["plain"]


def test_a_numpy_1_pickle_loads(tmp_path):
    data = pickle.dumps({"a": np.ones((2, 2), np.float32)}, protocol=2)
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data
    np.testing.assert_array_equal(obman.restricted_loads(old, tmp_path / "m.pkl")["a"], np.ones((2, 2)))


def test_a_python_2_pickle_loads_with_its_byte_strings_as_text(tmp_path):
    # What Python 2 writes for {'side': 'right', 'tags': set(['a'])}: byte strings and __builtin__.
    data = b"\x80\x02}q\x00(U\x04sideq\x01U\x05rightq\x02U\x04tagsq\x03c__builtin__\nset\nq\x04]q\x05U\x01aa\x85Rq\x06u."
    assert obman.restricted_loads(data, tmp_path / "m.pkl") == {"side": "right", "tags": {"a"}}


def test_a_truncated_pickle_is_a_bad_sample(tmp_path):
    data = pickle.dumps(valid_meta(), protocol=2)
    path = tmp_path / "00000003.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSample, match="00000003.pkl: meta pickle is (truncated|corrupt)"):
        obman.load_meta(path)


# --- meta validation ------------------------------------------------------------------------------


def test_a_valid_meta_loads_with_arrays_and_strings(tmp_path):
    meta = obman.load_meta(write_pickle(tmp_path / "m.pkl", valid_meta()))
    assert meta["affine_transform"].shape == (4, 4) and meta["class_id"] == "02876657"


def test_a_missing_key_is_named_with_the_file(tmp_path):
    meta = valid_meta()
    del meta["affine_transform"]
    path = write_pickle(tmp_path / "00000005.pkl", meta)
    with pytest.raises(BadSample) as info:
        obman.load_meta(path)
    assert str(info.value) == f"{path}: meta has no 'affine_transform'"


def test_a_wrong_shape_is_named_with_both_shapes(tmp_path):
    path = write_pickle(tmp_path / "m.pkl", valid_meta(verts_3d=np.zeros((10, 3))))
    with pytest.raises(BadSample, match=r"'verts_3d' has shape \(10, 3\), expected \(778, 3\)"):
        obman.load_meta(path)


def test_a_non_finite_affine_transform_is_refused(tmp_path):
    affine = np.eye(4)
    affine[0, 3] = np.nan
    path = write_pickle(tmp_path / "m.pkl", valid_meta(affine_transform=affine))
    with pytest.raises(BadSample, match="'affine_transform' is not finite"):
        obman.load_meta(path)


def test_a_pickle_that_is_not_a_dict_is_refused(tmp_path):
    with pytest.raises(BadSample, match="holds a list, expected a dict"):
        obman.load_meta(write_pickle(tmp_path / "m.pkl", [1, 2]))


def test_a_non_string_class_id_is_refused(tmp_path):
    with pytest.raises(BadSample, match="'class_id' is a int, expected a string"):
        obman.load_meta(write_pickle(tmp_path / "m.pkl", valid_meta(class_id=2876657)))


def test_a_missing_meta_file_is_a_bad_sample(tmp_path):
    with pytest.raises(BadSample, match="file is missing"):
        obman.load_meta(tmp_path / "nope.pkl")


# --- classes, poses, meshes -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "synset"), sorted(SYNSET_BY_CLASS.items()))
def test_each_synset_maps_to_its_qa_class(name, synset):
    assert obman.qa_class(valid_meta(class_id=synset)) == name


def test_a_mug_has_no_qa_class(tmp_path):
    with pytest.raises(BadSample, match="mug"):
        obman.qa_class(valid_meta(class_id="03797390"), tmp_path / "m.pkl")


def test_an_unknown_synset_is_a_bad_sample_naming_the_file(tmp_path):
    with pytest.raises(BadSample, match=r"m.pkl: unknown ShapeNet synset '01234567'"):
        obman.qa_class(valid_meta(class_id="01234567"), tmp_path / "m.pkl")


def test_object_to_camera_flips_blender_y_and_z():
    affine = np.eye(4)
    affine[:3, 3] = (0.1, 0.2, -0.6)
    pose = obman.object_to_camera(valid_meta(affine_transform=affine))
    np.testing.assert_allclose(pose[:3, 3], [0.1, -0.2, 0.6])
    np.testing.assert_allclose(pose[:3, :3], np.diag([1, -1, -1]))


def _mesh_at(root: Path) -> Path:
    mesh = root / "02876657" / "abc123" / "models" / "model_normalized.obj"
    mesh.parent.mkdir(parents=True)
    mesh.write_text("v 0 0 0\n")
    return mesh


def test_resolve_mesh_path_keeps_the_last_four_parts_under_root_shapenet(tmp_path):
    mesh = _mesh_at(tmp_path / "shapenet")
    assert obman.resolve_mesh_path(valid_meta(), tmp_path) == mesh


def test_resolve_mesh_path_uses_a_given_shapenet_root(tmp_path):
    mesh = _mesh_at(tmp_path / "ShapeNetCore.v2")
    assert obman.resolve_mesh_path(valid_meta(), tmp_path / "data", tmp_path / "ShapeNetCore.v2") == mesh


def test_a_missing_mesh_is_a_bad_sample_naming_the_expected_path(tmp_path):
    with pytest.raises(BadSample, match="object mesh is missing") as info:
        obman.resolve_mesh_path(valid_meta(), tmp_path)
    assert info.value.path.endswith("shapenet/02876657/abc123/models/model_normalized.obj")


@pytest.mark.parametrize(
    "obj_path", ["", "model.obj", "/x/../../models/model_normalized.obj", "/a/b/c/d.obj"]
)
def test_a_malformed_obj_path_is_refused(tmp_path, obj_path):
    with pytest.raises(BadSample, match="obj_path"):
        obman.resolve_mesh_path(valid_meta(obj_path=obj_path), tmp_path)


# --- back-projection ------------------------------------------------------------------------------


def test_planar_depth_of_a_fronto_parallel_plane_lifts_onto_the_plane():
    depth = np.full((256, 256), 2.0, np.float32)
    points = obman.backproject(depth, np.ones_like(depth, bool), depth_kind="planar")
    assert points.shape == (256 * 256, 3)
    np.testing.assert_allclose(points[:, 2], 2.0)
    # pixel (0, 0) is sampled at its centre (0.5, 0.5); the image centre (128, 128) is a pixel corner
    np.testing.assert_allclose(points[0, :2], (np.array([0.5, 0.5]) - 128) / 480 * 2.0)


def test_radial_depth_of_a_plane_lifts_onto_the_same_plane():
    rays = obman.pixel_rays(256, 256)
    depth = (2.0 * np.linalg.norm(rays, axis=-1)).astype(np.float32)  # distance along each ray to z = 2
    points = obman.backproject(depth, np.ones_like(depth, bool))
    np.testing.assert_allclose(points[:, 2], 2.0, rtol=1e-6)


def test_backproject_keeps_masked_pixels_with_a_depth_only():
    depth = np.full((4, 4), 1.0, np.float32)
    depth[0, 0] = np.nan
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True
    points = obman.backproject(depth, mask, depth_kind="planar")
    assert points.shape == (1, 3)
    np.testing.assert_allclose(points[0], [(1.5 - 128) / 480, (0.5 - 128) / 480, 1.0])


# --- admitting a sample: the one validator ----------------------------------------------------------


def write_frame(root: Path, sample_id: str = "00000042", size: int = 16) -> obman.SampleRef:
    ref = obman.SampleRef(root, "train", sample_id)
    for kind in obman.SAMPLE_FILES:
        ref.path(kind).parent.mkdir(parents=True, exist_ok=True)
    write_pickle(ref.meta_path, valid_meta())
    Image.new("RGB", (size, size), (90, 60, 30)).save(ref.rgb_path, quality=90)
    Image.new("RGB", (size, size), (90, 60, 30)).save(ref.rgb_obj_path, quality=90)
    write_png(ref.segm_path, np.full((size, size, 3), 100, np.uint8))
    write_png(ref.depth_path, np.full((size, size, 3), 128, np.uint8))
    return ref


def test_validate_sample_decodes_every_file_it_is_asked_for(tmp_path):
    ref = write_frame(tmp_path)
    sample = obman.validate_sample(ref, tuple(obman.SAMPLE_FILES))
    assert sample.rgb.shape == sample.rgb_obj.shape == sample.segm.shape == (16, 16, 3)
    assert sample.depth.dtype == np.float32 and sample.meta["class_id"] == "02876657"
    only = obman.validate_sample(ref, ("segm",))
    assert only.meta is None and only.rgb is None and only.segm is not None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(b""), "not a readable image"),
        (_truncated_jpeg, "truncated or corrupt"),
        (lambda p: p.write_bytes(np.random.default_rng(1).bytes(3000)), "not a readable image"),
    ],
    ids=["zero-bytes", "truncated", "random-bytes"],
)
def test_validate_sample_refuses_an_rgb_that_does_not_decode(tmp_path, damage, reason):
    ref = write_frame(tmp_path)
    damage(ref.rgb_path)
    with pytest.raises(BadSample) as info:
        obman.validate_sample(ref, ("meta", "segm", "rgb"))
    assert (info.value.path, info.value.sample_id) == (str(ref.rgb_path), ref.sample_id)
    assert reason in info.value.reason


def test_validate_sample_names_every_missing_file(tmp_path):
    ref = write_frame(tmp_path)
    ref.meta_path.unlink()
    ref.segm_path.unlink()
    with pytest.raises(BadSample) as info:
        obman.validate_sample(ref, ("rgb", "segm", "meta"))
    assert info.value.path == str(ref.segm_path)
    assert info.value.reason == "file is missing (also missing: meta)"


def test_validate_sample_refuses_images_of_different_sizes(tmp_path):
    ref = write_frame(tmp_path)
    write_png(ref.segm_path, np.full((8, 8, 3), 100, np.uint8))
    with pytest.raises(BadSample, match="segm is 8x8 but rgb is 16x16"):
        obman.validate_sample(ref, ("rgb", "segm"))


def test_admit_samples_keeps_the_good_and_says_why_the_others_are_refused(tmp_path):
    good, bad = write_frame(tmp_path, "00000001"), write_frame(tmp_path, "00000002")
    bad.depth_path.write_bytes(b"")
    admitted, refused = obman.admit_samples([good, bad], ("rgb", "segm", "depth", "meta"))
    assert admitted == [good]
    assert [(r.sample_id, r.path) for r in refused] == [(bad.sample_id, str(bad.depth_path))]
