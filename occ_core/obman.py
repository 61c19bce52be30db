"""Reading ObMan: one set of readers for the real dataset and for the synthetic stand-in (occ_core.synth).

Layout (docs/obman-moho.md A1-A5): ``ROOT/{split}/{rgb,rgb_obj,segm,depth,meta}/{id}.{jpg,png,pkl}`` with
8-digit sparse ids. ``segm`` and ``depth`` are 3-channel PNGs whose channels, in the order OpenCV reads
them (BGR), are [0] full scene, [1] hand only, [2] object only; PIL reads the file the other way round,
so every reader here reverses the channels. Meta pickles come from buckets and are untrusted: they are
loaded through a restricted unpickler that builds numpy arrays and plain values and nothing else.

Inspect a split from the shell:

    python -m occ_core.obman --root ROOT --split test
"""

from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import click
import numpy as np
from PIL import Image, UnidentifiedImageError

from occ_core.classes import CLASS_BY_SYNSET, MUG_SYNSET
from occ_core.config import get_settings
from occ_core.errors import BadSample

K: np.ndarray = np.array([[480.0, 0.0, 128.0], [0.0, 480.0, 128.0], [0.0, 0.0, 1.0]])
CAM_EXTR: np.ndarray = np.diag([1.0, -1.0, -1.0])
OBJECT_LABEL = 100
HAND_LABELS = (22, 24)
FOREARM_LABEL = 20
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 256

# Keys every consumer relies on (the official loaders read all of them), with their shapes;
# () stands for a scalar or a string.
REQUIRED_META_KEYS: dict[str, tuple] = {
    "side": (),
    "coords_2d": (21, 2),
    "coords_3d": (21, 3),
    "verts_3d": (778, 3),
    "hand_pose": (48,),
    "pca_pose": (45,),
    "affine_transform": (4, 4),
    "obj_path": (),
    "obj_scale": (),
    "class_id": (),
    "sample_id": (),
    "depth_min": (),
    "depth_max": (),
    "hand_depth_min": (),
    "hand_depth_max": (),
    "obj_depth_min": (),
    "obj_depth_max": (),
    "obj_visibility_ratio": (),
}
_STRING_KEYS = ("side", "obj_path", "class_id", "sample_id")
# Per depth channel (OpenCV order), the meta keys of its range.
DEPTH_RANGE_KEYS = (
    ("depth_min", "depth_max"),
    ("hand_depth_min", "hand_depth_max"),
    ("obj_depth_min", "obj_depth_max"),
)
DEPTH_CONVENTIONS = ("writer", "reader")
DEPTH_KINDS = ("radial", "planar")


# Every file of a frame: kind -> (folder, extension). A frame is any id with a file in one of them.
SAMPLE_FILES: dict[str, tuple[str, str]] = {
    "rgb": ("rgb", "jpg"),
    "rgb_obj": ("rgb_obj", "jpg"),
    "segm": ("segm", "png"),
    "depth": ("depth", "png"),
    "meta": ("meta", "pkl"),
}


@dataclass(frozen=True)
class SampleRef:
    """Where one ObMan frame lives: ``root/split/<folder>/<sample_id>.<ext>``."""

    root: Path
    split: str
    sample_id: str

    def path(self, kind: str) -> Path:
        """The file of one kind of SAMPLE_FILES (``rgb``, ``rgb_obj``, ``segm``, ``depth``, ``meta``)."""
        folder, ext = SAMPLE_FILES[kind]
        return Path(self.root) / self.split / folder / f"{self.sample_id}.{ext}"

    @property
    def rgb_path(self) -> Path:
        return self.path("rgb")

    @property
    def rgb_obj_path(self) -> Path:
        return self.path("rgb_obj")

    @property
    def segm_path(self) -> Path:
        return self.path("segm")

    @property
    def depth_path(self) -> Path:
        return self.path("depth")

    @property
    def meta_path(self) -> Path:
        return self.path("meta")


def _stems(folder: Path, suffix: str) -> set[str]:
    # scandir, not glob: 150k entries per folder; hidden files (._x.jpg from macOS copies) are no frames.
    try:
        with os.scandir(folder) as entries:
            return {
                e.name[: -len(suffix)]
                for e in entries
                if e.name.endswith(suffix) and not e.name.startswith(".") and e.is_file()
            }
    except (FileNotFoundError, NotADirectoryError):
        return set()


def list_samples(root: Path, split: str) -> list[SampleRef]:
    """Every frame of a split: each id with a file in any of its folders (ids are sparse), sorted by id.

    A frame missing some of its files is listed all the same, so that the stage reading it quarantines
    and counts it (see validate_sample) instead of losing it silently.

    Args:
        root: Dataset root holding the split folders.
        split: ``train``, ``val`` or ``test``.
    Returns:
        One SampleRef per id found under ``root/split/{rgb,rgb_obj,segm,depth,meta}``; an empty list when
        the split has none of those folders.
    """
    base = Path(root) / split
    ids: set[str] = set()
    for folder, ext in SAMPLE_FILES.values():
        ids |= _stems(base / folder, f".{ext}")
    return [SampleRef(Path(root), split, sample_id) for sample_id in sorted(ids)]


# --- meta pickles ---------------------------------------------------------------------------------

# numpy array and scalar reconstruction, under numpy 1 and numpy 2 module names.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}
# Python 3 writes bytes (array buffers) into protocol-2 pickles as _codecs.encode(text, "latin1").
_BYTES_GLOBALS = {("_codecs", "encode")}
_PLAIN_BUILTINS = {"set", "frozenset", "complex", "bytearray", "slice", "list", "dict", "tuple"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain Python values; any other global is refused before it is resolved."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            # numpy 2 keeps numpy.core only as a warning shim; pickles of either era load from _core.
            return super().find_class(module.replace("numpy.core.", "numpy._core."), name)
        if (module, name) in _BYTES_GLOBALS:
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in _PLAIN_BUILTINS:
            return super().find_class("builtins", name)
        raise BadSample(self._path, f"meta pickle refers to forbidden global {module}.{name}")


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSample(path, "file is missing") from None
    except OSError as exc:
        raise BadSample(path, f"cannot read file: {exc}") from exc


def _shape_of(value: Any) -> tuple | None:
    """Shape of an array-like meta value, () for scalars and strings, None for anything else."""
    if isinstance(value, (str, bytes, int, float, np.generic)):
        return ()
    if isinstance(value, np.ndarray):
        return value.shape
    if isinstance(value, (list, tuple)):
        return np.asarray(value).shape
    return None


def validate_meta(meta: Any, path: Path) -> dict:
    """Check a loaded meta dict: required keys, their shapes, a finite affine transform.

    Args:
        meta: The unpickled object.
        path: The pickle's path, named in errors.
    Returns:
        The dict, with byte strings of Python-2 pickles decoded and array-likes as numpy arrays.
    Raises:
        BadSample: Not a dict, a key missing, a shape wrong or the transform not finite.
    """
    if not isinstance(meta, dict):
        raise BadSample(path, f"meta pickle holds a {type(meta).__name__}, expected a dict")
    meta = dict(meta)
    for key, expected in REQUIRED_META_KEYS.items():
        if key not in meta:
            raise BadSample(path, f"meta has no {key!r}")
        value = meta[key]
        if key in _STRING_KEYS:
            if isinstance(value, bytes):
                value = meta[key] = value.decode("latin1")
            if not isinstance(value, str):
                raise BadSample(path, f"meta {key!r} is a {type(value).__name__}, expected a string")
            continue
        shape = _shape_of(value)
        if shape != expected:
            raise BadSample(path, f"meta {key!r} has shape {shape}, expected {expected}")
        if expected:
            meta[key] = np.asarray(value)
    affine = np.asarray(meta["affine_transform"], dtype=np.float64)
    if not np.isfinite(affine).all():
        raise BadSample(path, "meta 'affine_transform' is not finite")
    return meta


def restricted_loads(data: bytes, path: Path) -> Any:
    """Unpickle untrusted bytes: numpy arrays, numpy scalars and plain Python values only.

    Python-2 era pickles load too (``encoding="latin1"``).

    Args:
        data: The pickle's bytes.
        path: Where they came from, named in errors.
    Raises:
        BadSample: A forbidden global (nothing of it has run), a truncated or corrupt pickle.
    """
    try:
        return _RestrictedUnpickler(data, path).load()
    except BadSample:
        raise
    except EOFError:
        raise BadSample(path, "meta pickle is truncated") from None
    except Exception as exc:  # a corrupt pickle raises almost anything; all of it means "bad file"
        raise BadSample(path, f"meta pickle is corrupt: {type(exc).__name__}: {exc}") from exc


def load_meta(path: Path) -> dict:
    """Load and validate one ``meta/{id}.pkl`` through the restricted unpickler.

    Args:
        path: The meta pickle.
    Returns:
        The validated meta dict (see validate_meta).
    Raises:
        BadSample: Missing or unreadable file, a forbidden global, a corrupt pickle, invalid content.
    """
    path = Path(path)
    return validate_meta(restricted_loads(_read_bytes(path), path), path)


# --- images ---------------------------------------------------------------------------------------


def _read_image(path: Path, kind: str) -> np.ndarray:
    data = _read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != "RGB":
                raise BadSample(path, f"{kind} has mode {img.mode}, expected 3-channel RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except BadSample:
        raise
    except UnidentifiedImageError:
        raise BadSample(path, f"{kind} is not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadSample(path, f"{kind} is truncated or corrupt: {exc}") from exc


def read_rgb(path: Path) -> np.ndarray:
    """Read an ``rgb``/``rgb_obj`` JPEG.

    Returns:
        (H, W, 3) uint8, RGB order.
    Raises:
        BadSample: Missing, truncated, corrupt or not 3-channel.
    """
    return _read_image(Path(path), "image")


def read_segm(path: Path) -> np.ndarray:
    """Read a ``segm`` PNG.

    Returns:
        (H, W, 3) uint8 labels in OpenCV channel order: [0] full scene, [1] hand only, [2] object only.
    Raises:
        BadSample: Missing, truncated, corrupt or not 3-channel.
    """
    return _read_image(Path(path), "segm PNG")[:, :, ::-1].copy()


def decode_depth(
    encoded: np.ndarray, depth_min: float, depth_max: float, convention: str = "writer"
) -> np.ndarray:
    """Metres from one 8-bit depth channel; 0 is background (NaN).

    ``writer`` (obman_render): 1 is depth_min, 255 is depth_max. ``reader`` (the obman loaders): the
    opposite, 1 is depth_max and 255 is depth_min.
    """
    if convention not in DEPTH_CONVENTIONS:
        raise ValueError(f"depth convention must be one of {DEPTH_CONVENTIONS}, got {convention!r}")
    fraction = (encoded.astype(np.float32) - 1.0) / 254.0
    if convention == "reader":
        fraction = 1.0 - fraction
    depth = np.float32(depth_min) + fraction * np.float32(depth_max - depth_min)
    return np.where(encoded > 0, depth, np.float32(np.nan)).astype(np.float32)


def encode_depth(depth: np.ndarray) -> tuple[np.ndarray, float, float]:
    """One depth channel to 8 bits, the writer way: 0 background (NaN or 0), 1 nearest .. 255 farthest.

    Returns:
        (uint8 image, depth_min, depth_max); both 0.0 when no pixel is valid.
    """
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        return np.zeros(depth.shape, np.uint8), 0.0, 0.0
    d_min, d_max = float(depth[valid].min()), float(depth[valid].max())
    span = d_max - d_min if d_max > d_min else 1.0
    scaled = np.rint(1.0 + 254.0 * (np.where(valid, depth, d_min) - d_min) / span)
    return np.where(valid, scaled, 0).astype(np.uint8), d_min, d_max


def read_depth(path: Path, meta: dict, convention: str | None = None) -> np.ndarray:
    """Read a ``depth`` PNG and decode its three channels with their ranges from meta.

    Args:
        path: The depth PNG.
        meta: The frame's meta (``depth_min/max``, ``hand_depth_min/max``, ``obj_depth_min/max``).
        convention: ``writer`` or ``reader`` (see decode_depth); None takes settings.depth_convention.
    Returns:
        (H, W, 3) float32 metres, channels [0] full scene, [1] hand only, [2] object only; NaN background.
    Raises:
        BadSample: Missing, truncated or corrupt PNG.
    """
    convention = convention or get_settings().depth_convention
    encoded = _read_image(Path(path), "depth PNG")[:, :, ::-1]
    channels = [
        decode_depth(encoded[:, :, c], float(meta[lo]), float(meta[hi]), convention)
        for c, (lo, hi) in enumerate(DEPTH_RANGE_KEYS)
    ]
    return np.stack(channels, axis=-1)


# --- admitting a sample ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleData:
    """The decoded files of one frame; a kind that was not asked for is None."""

    ref: SampleRef
    meta: dict | None = None
    rgb: np.ndarray | None = None
    rgb_obj: np.ndarray | None = None
    segm: np.ndarray | None = None
    depth: np.ndarray | None = None


def validate_sample(
    ref: SampleRef, need: tuple[str, ...] = ("rgb", "segm", "meta"), convention: str | None = None
) -> SampleData:
    """Admit one frame: every file in ``need`` is present and decodes fully, and its images agree in size.

    The one admission rule of every stage that reads ObMan frames (datasets, reconstruct, render), so a
    file one stage quarantines is never a training row of another. Each file is read and decoded once.

    Args:
        ref: The frame.
        need: Kinds of SAMPLE_FILES the caller uses; ``depth`` reads ``meta`` too, for its ranges.
        convention: Depth direction (see decode_depth); None takes settings.depth_convention.
    Returns:
        The decoded pieces: meta (validated), images as read_rgb / read_segm / read_depth return them.
    Raises:
        BadSample: Naming the file, the reason and the sample id: a file missing (the reason lists every
            missing kind), unreadable, truncated, corrupt, not 3-channel, or of another size.
        ValueError: A kind outside SAMPLE_FILES (a bug in the caller).
    """
    unknown = set(need) - set(SAMPLE_FILES)
    if unknown:
        raise ValueError(
            f"unknown sample file kinds {sorted(unknown)}; expected some of {list(SAMPLE_FILES)}"
        )
    missing = [kind for kind in need if not ref.path(kind).is_file()]
    if missing:
        others = f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""
        raise BadSample(ref.path(missing[0]), f"file is missing{others}", ref.sample_id)
    pieces: dict[str, Any] = {}
    try:
        if "meta" in need or "depth" in need:
            pieces["meta"] = load_meta(ref.meta_path)
        for kind in ("rgb", "rgb_obj"):
            if kind in need:
                pieces[kind] = read_rgb(ref.path(kind))
        if "segm" in need:
            pieces["segm"] = read_segm(ref.segm_path)
        if "depth" in need:
            pieces["depth"] = read_depth(ref.depth_path, pieces["meta"], convention)
    except BadSample as bad:
        raise BadSample(bad.path, bad.reason, ref.sample_id) from None
    sizes = {kind: value.shape[:2] for kind, value in pieces.items() if kind != "meta"}
    first = next(iter(sizes), None)
    for kind, size in sizes.items():
        if size != sizes[first]:
            raise BadSample(
                ref.path(kind),
                f"{kind} is {size[1]}x{size[0]} but {first} is {sizes[first][1]}x{sizes[first][0]}",
                ref.sample_id,
            )
    return SampleData(ref, **pieces)


def admit_samples(
    refs: list[SampleRef] | tuple[SampleRef, ...], need: tuple[str, ...]
) -> tuple[list[SampleRef], list[BadSample]]:
    """Split frames into those validate_sample admits and the reasons the others are refused.

    For stages whose backends read the files themselves; the decoded pieces are not kept.
    """
    admitted, refused = [], []
    for ref in refs:
        try:
            validate_sample(ref, need)
        except BadSample as bad:
            refused.append(bad)
        else:
            admitted.append(ref)
    return admitted, refused


# --- object and camera ----------------------------------------------------------------------------


def qa_class(meta: dict, path: Path | None = None) -> str:
    """The QA class of a frame's object, from its ShapeNet synset.

    Raises:
        BadSample: The synset is not one of the 8 QA classes (mugs included).
    """
    synset = meta.get("class_id")
    if synset in CLASS_BY_SYNSET:
        return CLASS_BY_SYNSET[synset]
    where = path if path is not None else "meta"
    if synset == MUG_SYNSET:
        raise BadSample(where, f"synset {synset} (mug) has no QA class")
    raise BadSample(where, f"unknown ShapeNet synset {synset!r}")


def object_to_camera(meta: dict) -> np.ndarray:
    """4x4 pose of the object model in the OpenCV camera frame: diag(1,-1,-1,1) @ affine_transform."""
    return np.diag([1.0, -1.0, -1.0, 1.0]) @ np.asarray(meta["affine_transform"], dtype=np.float64)


def resolve_mesh_path(meta: dict, root: Path, shapenet_root: Path | None = None) -> Path:
    """The local copy of a frame's object mesh.

    ``obj_path`` is absolute on the authors' machine; its last four parts
    (``{synset}/{sample}/models/model_normalized.obj``) are looked up under ``shapenet_root``.

    Args:
        meta: The frame's meta.
        root: Dataset root (holds the split folders).
        shapenet_root: Where ShapeNet lives; default ``root / "shapenet"``.
    Raises:
        BadSample: obj_path is malformed or the mesh is missing.
    """
    obj_path = str(meta.get("obj_path", ""))
    tail = PurePosixPath(obj_path.replace("\\", "/")).parts[-4:]
    if len(tail) != 4 or tail[2] != "models" or any(part in ("", ".", "..") for part in tail):
        raise BadSample(Path(obj_path), "obj_path does not end in {synset}/{sample}/models/<file>")
    mesh_path = Path(shapenet_root if shapenet_root is not None else Path(root) / "shapenet").joinpath(*tail)
    if not mesh_path.is_file():
        raise BadSample(mesh_path, f"object mesh is missing (obj_path {obj_path})")
    return mesh_path


def pixel_rays(height: int, width: int, K: np.ndarray = K) -> np.ndarray:
    """(H, W, 3) rays K^-1 [u, v, 1] through every pixel centre.

    Pixels follow Blender, which rendered ObMan: pixel (i, j) spans [i, i+1) x [j, j+1), so its centre
    is (i + 0.5, j + 0.5) and (cx, cy) = (128, 128) is the image centre.
    """
    v, u = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1)
    return pixels @ np.linalg.inv(K).T


def backproject(
    depth: np.ndarray, mask: np.ndarray, K: np.ndarray = K, depth_kind: str = "radial"
) -> np.ndarray:
    """Camera-frame points of masked pixels.

    Pixels of ``mask`` whose depth is NaN are left out; select with ``mask & np.isfinite(depth)`` to
    pair points with pixel colours.

    Args:
        depth: (H, W) metres; ``radial`` = distance from the camera centre along the ray,
            ``planar`` = z along the optical axis.
        mask: (H, W) bool, the pixels to lift.
        K: 3x3 intrinsics; pixel (i, j) is sampled at its centre (i + 0.5, j + 0.5), see pixel_rays.
        depth_kind: ``radial`` or ``planar``.
    Returns:
        (N, 3) float64 points in the OpenCV camera frame (x right, y down, z forward), row-major order.
    """
    if depth_kind not in DEPTH_KINDS:
        raise ValueError(f"depth_kind must be one of {DEPTH_KINDS}, got {depth_kind!r}")
    select = np.asarray(mask, bool) & np.isfinite(depth)
    rays = pixel_rays(*depth.shape, K)[select]
    if depth_kind == "radial":
        rays = rays / np.linalg.norm(rays, axis=1, keepdims=True)
    return rays * depth[select].astype(np.float64)[:, None]


def _describe_split(root: Path, split: str, convention: str) -> dict[str, Any]:
    refs = list_samples(root, split)
    classes: Counter[str] = Counter()
    bad: list[str] = []
    visibility: list[float] = []
    for ref in refs:
        try:
            meta = validate_sample(ref, ("meta", "rgb", "segm", "depth"), convention).meta
            classes[qa_class(meta, ref.meta_path)] += 1
            visibility.append(float(meta["obj_visibility_ratio"]))
        except BadSample as exc:
            bad.append(str(exc))
    summary: dict[str, Any] = {"split": split, "frames": len(refs), "bad": len(bad), **dict(classes)}
    if visibility:
        summary["visibility_mean"] = round(sum(visibility) / len(visibility), 3)
    return summary | ({"first_bad": bad[0]} if bad else {})


@click.command()
@click.option("--root", type=click.Path(path_type=Path, exists=True), required=True, help="Dataset root.")
@click.option("--split", "splits", multiple=True, default=SPLITS, help="Split(s) to read (repeatable).")
@click.option(
    "--depth-convention",
    type=click.Choice(DEPTH_CONVENTIONS),
    default=None,
    help="Depth PNG direction; default from OCC_DEPTH_CONVENTION.",
)
def cli(root: Path, splits: tuple[str, ...], depth_convention: str | None) -> None:
    """Read every frame of the given splits and print counts per class and bad files."""
    for split in splits:
        summary = _describe_split(root, split, depth_convention or get_settings().depth_convention)
        click.echo("  ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    cli()
