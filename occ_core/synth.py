"""Synthetic ObMan: the embedded default dataset, in ObMan's real layout and encodings.

    occ synth --out ROOT --n N --seed S [--splits train,val,test] [--processes P] [--class-weights jar=2,...]

writes ``ROOT/{split}/{rgb,rgb_obj,segm,depth,meta}/{id}`` (docs/obman-moho.md A1-A5, C1), the object
meshes under ``ROOT/shapenet/{synset}/{sample_id}/models/model_normalized.obj`` and
``ROOT/synth_info.json``, so that occ_core.obman reads real and synthetic data alike.

Each frame: a procedural mesh of one of the 8 QA classes (occ_core.shapes; the shape carries the class,
colours are random), posed at 0.5-0.8 m in front of a fixed 480/128 camera, partly hidden by a crude
hand (labels 22/24, forearm 20) placed so that the object's visible fraction spreads over about
0.4-1.0, over a random background. As in ObMan, a frame whose object is less than 40% visible is
dropped and its id stays unused; ids are also skipped on purpose, so they are sparse. ``--n`` counts
kept frames per split. Every random choice of a frame comes from a generator seeded with
(seed, split, attempt index), so the output is the same whatever the number of processes.

Conventions written (also in synth_info.json and every meta): depth PNG in obman_render's "writer"
direction (0 background, 1 nearest .. 255 farthest, per-channel min/max in meta) and "radial" depth
(distance from the camera centre along the pixel ray, as Cycles' Z pass); pixels as in Blender (pixel
(i, j) spans [i, i+1) x [j, j+1)), so ``occ_core.obman.backproject(depth, mask, K)`` inverts the
render and occ_core.render's views line up with the photos.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import shutil
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import click
import numpy as np
import trimesh
from PIL import Image, ImageDraw, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from occ_core import obman, shapes
from occ_core.classes import QA_CLASSES, SYNSET_BY_CLASS, class_priors
from occ_core.config import configure_offscreen_gl, field_help, get_settings
from occ_core.errors import StageError
from occ_core.fsio import atomic_path, write_bytes_atomic, write_json_atomic
from occ_core.splits import SPLITS, SplitName, check_split
from occ_core.stage import StageReport, Timer, code_version, params_hash, stage_dir, stage_key
from occ_core.workers import spawn_pool

DEPTH_CONVENTION = "writer"
DEPTH_KIND = "radial"
AUTHORS_SHAPENET = "/synthetic/ShapeNetCore.v2"
# Bounding-box diagonal of each class in metres (before a +-15% jitter): hand-held sizes.
CLASS_SIZE_M = {
    "bottle": 0.26,
    "bowl": 0.22,
    "can": 0.16,
    "jar": 0.21,
    "knife": 0.26,
    "cellphone": 0.17,
    "camera": 0.15,
    "remote": 0.21,
}
_SIZE = obman.IMAGE_SIZE


class SynthConfig(BaseModel):
    """Parameters of one synthetic ObMan dataset. Everything except ``out`` decides its content."""

    model_config = ConfigDict(frozen=True)

    out: Path = Field(description="dataset root: split folders, shapenet/ and synth_info.json go here")
    n: int = Field(8, ge=1, description="frames kept per split (dropped frames do not count)")
    seed: int = Field(0, ge=0, description="seed of every random choice; same seed, same bytes")
    splits: tuple[SplitName, ...] = Field(SPLITS, description="split folders to write, each a name")
    class_weights: dict[str, float] = Field(
        default_factory=class_priors,
        description="relative class frequencies; default: class counts of OCC's 10K train set",
    )
    min_visibility: float = Field(
        0.4, ge=0.0, le=1.0, description="frames whose object is less visible are dropped (ObMan: 0.4)"
    )
    id_gap_probability: float = Field(
        0.1, ge=0.0, lt=1.0, description="chance that an id is skipped on purpose before each attempt"
    )
    meshes_per_class: int = Field(
        24,
        ge=1,
        description="distinct meshes per class and split; frames reuse them, as ObMan reuses ShapeNet",
    )
    jpeg_quality: int = Field(92, ge=50, le=100, description="JPEG quality of rgb/ and rgb_obj/")

    @field_validator("splits")
    @classmethod
    def _distinct_splits(cls, splits: tuple[str, ...]) -> tuple[str, ...]:
        if not splits:
            raise ValueError("splits must name at least one split")
        repeated = sorted({s for s in splits if splits.count(s) > 1})
        if repeated:
            raise ValueError(f"splits lists {repeated} more than once, got {list(splits)}")
        return splits

    @field_validator("class_weights")
    @classmethod
    def _known_classes(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(QA_CLASSES))
        if unknown:
            raise ValueError(f"class_weights has unknown classes {unknown}; known: {', '.join(QA_CLASSES)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"class_weights must be >= 0 with a positive sum, got {weights}")
        return weights

    def content_params(self) -> dict[str, Any]:
        """The parameters that decide the bytes written (everything but ``out``)."""
        return self.model_dump(mode="json", exclude={"out"})


# --- one frame ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One attempted frame: its place in the split's sequence and the id it consumes."""

    split: str
    index: int
    frame_id: str


@dataclass
class Frame:
    """The outcome of an attempt: encoded files (relative to the split folder) when kept."""

    attempt: Attempt
    class_name: str
    visibility: float
    files: dict[str, bytes] = field(default_factory=dict)
    mesh_index: int = -1

    @property
    def kept(self) -> bool:
        return bool(self.files)


def frame_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one attempt, independent of every other attempt and of the process running it."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def frame_ids(cfg: SynthConfig, split: str) -> Iterator[str]:
    """The split's 8-digit ids, in attempt order: consecutive except for deliberate random gaps."""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), 2**31])
    next_id = 0
    while True:
        while rng.random() < cfg.id_gap_probability:
            next_id += 1
        yield f"{next_id:08d}"
        next_id += 1


@lru_cache(maxsize=256)
def pool_mesh(seed: int, split: str, class_name: str, mesh_index: int) -> tuple[str, trimesh.Trimesh]:
    """Mesh ``mesh_index`` of a class's pool in a split, and its fake ShapeNet sample id (32 hex digits).

    Splits have disjoint pools, as ObMan splits its ShapeNet models.
    """
    key = f"occ-synth/{seed}/{split}/{SYNSET_BY_CLASS[class_name]}/{mesh_index}"
    sample_id = hashlib.sha256(key.encode()).hexdigest()[:32]
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), QA_CLASSES.index(class_name), mesh_index])
    return sample_id, shapes.class_mesh(class_name, rng)


def mesh_file(root: Path, synset: str, sample_id: str) -> Path:
    """Where a synthetic ShapeNet mesh lives under the dataset root."""
    return root / "shapenet" / synset / sample_id / "models" / "model_normalized.obj"


def _write_mesh_once(path: Path, mesh: trimesh.Trimesh) -> None:
    if path.exists():
        return
    with atomic_path(path) as tmp:
        mesh.export(tmp, file_type="obj", include_normals=False, include_texture=False)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A hand-held orientation: any turn about the model's up axis, a tilt, any roll in the image."""
    yaw = trimesh.transformations.rotation_matrix(rng.uniform(-np.pi, np.pi), [0, 1, 0])
    tilt = trimesh.transformations.rotation_matrix(rng.uniform(-0.9, 0.9), [1, 0, 0])
    roll = trimesh.transformations.rotation_matrix(rng.uniform(-np.pi, np.pi), [0, 0, 1])
    return roll @ tilt @ yaw


def object_pose(class_name: str, rng: np.random.Generator) -> np.ndarray:
    """``affine_transform`` (float32, Blender camera frame, scale included) of a held object."""
    scale = CLASS_SIZE_M[class_name] * rng.uniform(0.85, 1.15)
    distance = rng.uniform(0.5, 0.8)
    affine = _rotation(rng)
    affine[:3, :3] *= scale
    affine[:3, 3] = (distance * rng.uniform(-0.06, 0.06), distance * rng.uniform(-0.06, 0.06), -distance)
    return affine.astype(np.float32)


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``mask`` moved by (dx, dy) pixels, zero-filled."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def occluding_shift(object_mask: np.ndarray, hand_mask: np.ndarray, cover: float, angle: float) -> np.ndarray:
    """Pixel shift along ``angle`` that makes the hand cover about ``cover`` of the object mask.

    Coverage falls as the hand slides off the object, so a bisection on the distance finds it; when
    the hand cannot cover that much even centred, it stays centred.
    """
    area = object_mask.sum()
    direction = np.array([np.cos(angle), np.sin(angle)])

    def coverage(distance: float) -> float:
        dx, dy = np.rint(direction * distance).astype(int)
        return (object_mask & _shift(hand_mask, dx, dy)).sum() / area

    low, high = 0.0, float(_SIZE)
    if coverage(low) <= cover:
        return np.zeros(2)
    for _ in range(10):
        middle = (low + high) / 2
        low, high = (middle, high) if coverage(middle) > cover else (low, middle)
    return direction * high


def background(rng: np.random.Generator) -> np.ndarray:
    """A random 256x256 RGB background: a gradient, smooth colour blobs and a few shapes."""
    a, b = shapes.random_colour(rng).astype(float), shapes.random_colour(rng).astype(float)
    angle = rng.uniform(0, 2 * np.pi)
    v, u = np.mgrid[0:_SIZE, 0:_SIZE] / _SIZE
    t = np.clip((np.cos(angle) * (u - 0.5) + np.sin(angle) * (v - 0.5)) + 0.5, 0, 1)[..., None]
    blobs = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(
        (_SIZE, _SIZE), Image.BICUBIC
    )
    image = (a * (1 - t) + b * t) * 0.7 + np.asarray(blobs, dtype=float) * 0.3
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = rng.integers(-40, _SIZE, 2)
        x1, y1 = x0 + rng.integers(20, 140), y0 + rng.integers(20, 140)
        colour = tuple(int(c) for c in shapes.random_colour(rng))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(
            [int(x0), int(y0), int(x1), int(y1)], fill=colour
        )
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5))))


def _axis_angle(rotation: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    angle, axis, _ = trimesh.transformations.rotation_from_matrix(matrix)
    return (np.asarray(axis) * angle).astype(np.float32)


def project(points_blender: np.ndarray) -> np.ndarray:
    """Pixel coordinates (u, v) of Blender camera-frame points, with obman.K."""
    cv = points_blender @ obman.CAM_EXTR.T
    uvw = cv @ obman.K.T
    return uvw[:, :2] / uvw[:, 2:3]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _opencv_order_png(channels: list[np.ndarray]) -> bytes:
    """A 3-channel PNG that OpenCV's imread (BGR) returns as ``channels`` [0], [1], [2]."""
    return _png(np.stack(channels[::-1], axis=-1))


# --- rendering ------------------------------------------------------------------------------------


class SceneRenderer:
    """One offscreen GL context (camera at the Blender origin) and the passes a frame needs.

    pyrender's camera frame and pixel grid are OpenGL's, which are Blender's: geometry posed by
    ``affine_transform`` renders as in ObMan, pixel (i, j) covering [i, i+1) x [j, j+1).
    """

    def __init__(self) -> None:
        configure_offscreen_gl()
        import pyrender

        self.pyrender = pyrender
        fx, fy, cx, cy = obman.K[0, 0], obman.K[1, 1], obman.K[0, 2], obman.K[1, 2]
        self.camera = pyrender.IntrinsicsCamera(fx, fy, cx, cy, znear=0.05, zfar=10.0)
        self._renderer = pyrender.OffscreenRenderer(_SIZE, _SIZE)
        self._ray_length = np.linalg.norm(obman.pixel_rays(_SIZE, _SIZE), axis=-1).astype(np.float32)

    def close(self) -> None:
        self._renderer.delete()

    def radial(self, planar: np.ndarray) -> np.ndarray:
        """Planar z (0 = nothing) to ray distance (NaN = nothing)."""
        return np.where(planar > 0, planar * self._ray_length, np.float32(np.nan)).astype(np.float32)

    def colour(self, scene: Any, coverage: np.ndarray) -> np.ndarray:
        """Shaded RGBA render of the visible meshes, alpha 0 where nothing was drawn.

        With EGL the edges are anti-aliased. OSMesa renders to a window buffer that pyrender reads
        without alpha: there the alpha is ``coverage`` (the meshes' label mask), so edges are hard.
        """
        colour, _ = self._renderer.render(scene, flags=self.pyrender.RenderFlags.RGBA)
        if colour.shape[2] == 4:
            return colour
        return np.concatenate([colour, np.where(coverage, 255, 0).astype(np.uint8)[..., None]], axis=2)

    def labels(self, scene: Any, labels: dict[Any, int]) -> tuple[np.ndarray, np.ndarray]:
        """Exact label image (no anti-aliasing, 0 = nothing) and planar depth of the labelled nodes only."""
        seg = {node: (label, label, label) for node, label in labels.items()}
        image, depth = self._renderer.render(scene, flags=self.pyrender.RenderFlags.SEG, seg_node_map=seg)
        return image[:, :, 0].copy(), depth


class FrameScene:
    """One frame's scene: the object posed by ``affine_transform``, the hand by a movable pose.

    Meshes are uploaded once per frame and shared by every pass.
    """

    def __init__(
        self,
        renderer: SceneRenderer,
        model: trimesh.Trimesh,
        affine: np.ndarray,
        hand: shapes.Hand,
        light: tuple[np.ndarray, float],
    ) -> None:
        pr = renderer.pyrender
        self.renderer = renderer
        self.scene = pr.Scene(bg_color=[0.0, 0.0, 0.0, 0.0], ambient_light=[0.35, 0.35, 0.35])
        self.scene.add(renderer.camera, pose=np.eye(4))
        light_pose, intensity = light
        self.scene.add(pr.DirectionalLight(color=np.ones(3), intensity=intensity), pose=light_pose)
        self.object = self.scene.add(
            pr.Mesh.from_trimesh(model, smooth=False), pose=affine.astype(np.float64)
        )
        self.hand = {
            self.scene.add(pr.Mesh.from_trimesh(mesh, smooth=False)): label
            for label, mesh in hand.meshes_by_label().items()
        }

    def pose_hand(self, pose: np.ndarray) -> None:
        for node in self.hand:
            self.scene.set_pose(node, pose)

    def object_labels(self) -> tuple[np.ndarray, np.ndarray]:
        return self.renderer.labels(self.scene, {self.object: obman.OBJECT_LABEL})

    def hand_labels(self) -> tuple[np.ndarray, np.ndarray]:
        return self.renderer.labels(self.scene, self.hand)

    def colour(self, with_hand: bool, coverage: np.ndarray) -> np.ndarray:
        for node in self.hand:
            node.mesh.is_visible = with_hand
        return self.renderer.colour(self.scene, coverage)


_RENDERER: SceneRenderer | None = None


def _init_worker() -> None:
    global _RENDERER
    _RENDERER = SceneRenderer()


def _light(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    pose = trimesh.transformations.rotation_matrix(rng.uniform(-0.8, 0.8), [1, 0, 0])
    pose = trimesh.transformations.rotation_matrix(rng.uniform(-0.8, 0.8), [0, 1, 0]) @ pose
    return pose, float(rng.uniform(2.0, 4.5))


def _hand_pose(rng: np.random.Generator, centre: np.ndarray, slide_angle: float) -> np.ndarray:
    """Palm towards the camera (+Z), a moderate tilt, palm centre at ``centre``; turned in the image
    so that the fingers point back along the slide (towards the object) and the forearm away."""
    # The hand's +Y (fingers) in image terms is (-sin roll, -cos roll) with v down; the slide moves the
    # hand along (cos a, sin a), so roll = pi/2 - a points the fingers back towards the object.
    roll = np.pi / 2 - slide_angle + rng.normal(0.0, 0.4)
    pose = trimesh.transformations.rotation_matrix(roll, [0, 0, 1])
    pose = pose @ trimesh.transformations.rotation_matrix(rng.uniform(-0.5, 0.5), [1, 0, 0])
    pose = pose @ trimesh.transformations.rotation_matrix(rng.uniform(-0.5, 0.5), [0, 1, 0])
    pose[:3, 3] = centre
    return pose


def render_attempt(cfg: SynthConfig, attempt: Attempt, renderer: SceneRenderer | None = None) -> Frame:
    """Build, render and encode one attempted frame; it is kept when its object is visible enough.

    Args:
        cfg: Dataset parameters.
        attempt: Split, attempt index and the id it consumes.
        renderer: The GL context to use; None takes this worker process's own.
    Returns:
        A Frame: files (relative to the split folder) when kept, none when dropped.
    """
    renderer = renderer or _RENDERER
    assert renderer is not None, "render_attempt needs a SceneRenderer (worker not initialised)"
    rng = frame_rng(cfg.seed, attempt.split, attempt.index)
    names = [c for c in QA_CLASSES if cfg.class_weights.get(c, 0) > 0]
    weights = np.array([cfg.class_weights[c] for c in names], dtype=float)
    class_name = names[rng.choice(len(names), p=weights / weights.sum())]
    mesh_index = int(rng.integers(cfg.meshes_per_class))
    sample_id, model = pool_mesh(cfg.seed, attempt.split, class_name, mesh_index)
    synset = SYNSET_BY_CLASS[class_name]

    affine = object_pose(class_name, rng)
    hand = shapes.hand_occluder(rng)
    frame = FrameScene(renderer, model, affine, hand, _light(rng))
    object_labels, object_planar = frame.object_labels()
    object_mask = object_labels > 0
    if not object_mask.any():
        return Frame(attempt, class_name, 0.0)

    # Hand in front of the object, first on the ray through its centre, then slid sideways until it
    # covers about the wanted share of the object.
    front_z = trimesh.transform_points(model.vertices, affine)[:, 2].max()
    depth = -front_z - rng.uniform(0.015, 0.06)
    centre_ray = affine[:3, 3] / -affine[2, 3]
    slide_angle = rng.uniform(0, 2 * np.pi)
    hand_pose = _hand_pose(rng, centre_ray * depth, slide_angle)
    frame.pose_hand(hand_pose)
    reference_labels, _ = frame.hand_labels()
    target = rng.uniform(cfg.min_visibility - 0.05, 1.0)
    du, dv = occluding_shift(object_mask, reference_labels > 0, 1.0 - target, slide_angle)
    hand_pose[:3, 3] += np.array([du, -dv, 0.0]) * depth / obman.K[0, 0]
    frame.pose_hand(hand_pose)
    hand_labels, hand_planar = frame.hand_labels()

    object_depth, hand_depth = renderer.radial(object_planar), renderer.radial(hand_planar)
    object_wins = object_mask & ~(hand_depth < object_depth)  # NaN compares False: no hand there
    scene_labels = np.where(object_wins, obman.OBJECT_LABEL, hand_labels).astype(np.uint8)
    scene_depth = np.fmin(object_depth, hand_depth)
    visibility = float((scene_labels == obman.OBJECT_LABEL).sum() / object_mask.sum())
    if visibility < cfg.min_visibility:
        return Frame(attempt, class_name, visibility)

    backdrop = background(rng).astype(np.float32)
    rgb = _over(frame.colour(with_hand=True, coverage=scene_labels > 0), backdrop)
    rgb_obj = _over(frame.colour(with_hand=False, coverage=object_mask), backdrop)

    encoded, ranges = [], {}
    for image, (lo, hi) in zip((scene_depth, hand_depth, object_depth), obman.DEPTH_RANGE_KEYS, strict=True):
        channel, ranges[lo], ranges[hi] = obman.encode_depth(image)
        encoded.append(channel)
    meta = _meta(
        cfg, attempt, rng, class_name, synset, sample_id, affine, hand, hand_pose, visibility, ranges
    )
    object_segm = np.where(object_mask, obman.OBJECT_LABEL, 0).astype(np.uint8)
    files = {
        f"rgb/{attempt.frame_id}.jpg": _jpeg(rgb, cfg.jpeg_quality),
        f"rgb_obj/{attempt.frame_id}.jpg": _jpeg(rgb_obj, cfg.jpeg_quality),
        f"segm/{attempt.frame_id}.png": _opencv_order_png([scene_labels, hand_labels, object_segm]),
        f"depth/{attempt.frame_id}.png": _opencv_order_png(encoded),
        f"meta/{attempt.frame_id}.pkl": pickle.dumps(meta, protocol=2),
    }
    return Frame(attempt, class_name, visibility, files, mesh_index)


def _over(rgba: np.ndarray, backdrop: np.ndarray) -> np.ndarray:
    alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
    return np.rint(rgba[:, :, :3] * alpha + backdrop * (1 - alpha)).astype(np.uint8)


def _meta(
    cfg: SynthConfig,
    attempt: Attempt,
    rng: np.random.Generator,
    class_name: str,
    synset: str,
    sample_id: str,
    affine: np.ndarray,
    hand: shapes.Hand,
    hand_pose: np.ndarray,
    visibility: float,
    depth_ranges: dict[str, float],
) -> dict[str, Any]:
    """The meta dict with ObMan's keys and shapes (docs/obman-moho.md A2); hand values from the occluder."""
    f32 = np.float32
    articulation = rng.normal(0.0, 0.3, 45).astype(f32)
    global_rot = _axis_angle(hand_pose[:3, :3])
    joints = trimesh.transform_points(hand.joints, hand_pose)
    verts = trimesh.transform_points(hand.surface_points(778, rng), hand_pose)
    pose = np.zeros(156, f32)
    pose[111:] = articulation  # 66 body values, 45 left-hand then 45 right-hand PCA values
    return {
        "side": "right",
        "coords_2d": project(joints).astype(f32),
        "coords_3d": joints.astype(f32),
        "verts_3d": verts.astype(f32),
        "hand_pose": np.concatenate([global_rot, articulation]).astype(f32),
        "pca_pose": articulation,
        "mano_pose": articulation.copy(),
        "hand_global_rot": global_rot,
        "hand_trans": hand_pose[:3, 3].astype(f32),
        "pose": pose,
        "shape": np.zeros(10, f32),
        "trans": hand_pose[:3, 3].astype(f32),
        "z": float(-joints[0, 2]),
        "affine_transform": affine,
        "obj_path": f"{AUTHORS_SHAPENET}/{synset}/{sample_id}/models/model_normalized.obj",
        "obj_scale": float(np.linalg.norm(affine[:3, 0])),
        "obj_texture": f"synthetic:vertex-colours/{sample_id}",
        "class_id": synset,
        "sample_id": sample_id,
        "grasp_quality": float(rng.uniform(0.0, 0.2)),
        "grasp_epsilon": float(rng.uniform(0.0, 0.2)),
        "grasp_volume": float(rng.uniform(0.0, 0.01)),
        **depth_ranges,
        "obj_visibility_ratio": visibility,
        "bg_path": f"synthetic:background/{attempt.split}/{attempt.frame_id}",
        "sh_coeffs": rng.normal(0.0, 0.3, 9).astype(f32),
        "body_tex": "synthetic:skin",
        "depth_convention": DEPTH_CONVENTION,
        "depth_kind": DEPTH_KIND,
    }


# --- the whole dataset ----------------------------------------------------------------------------

Runner = Callable[[list[Attempt]], list[Frame]]


def _render_job(job: tuple[SynthConfig, Attempt]) -> Frame:
    return render_attempt(*job)


@contextlib.contextmanager
def attempt_runner(cfg: SynthConfig, processes: int) -> Iterator[Runner]:
    """A function that renders a batch of attempts in order: in this process, or in a spawned pool
    whose workers each keep one GL context (spawn, because a forked GL context is not usable) and exit
    with this process, even when it is killed (occ_core.workers)."""
    if processes == 1:
        renderer = SceneRenderer()
        try:
            yield lambda attempts: [render_attempt(cfg, a, renderer) for a in attempts]
        finally:
            renderer.close()
        return
    configure_offscreen_gl()  # before spawning: the workers inherit the environment
    with spawn_pool(processes, initializer=_init_worker) as pool:
        yield lambda attempts: list(pool.map(_render_job, [(cfg, a) for a in attempts]))


def _generate_split(cfg: SynthConfig, split: str, run: Runner, processes: int, report: StageReport) -> dict:
    """Attempt frames in order until ``cfg.n`` are kept; write the kept ones. Returns split statistics."""
    split_dir = cfg.out / split
    ids = frame_ids(cfg, split)
    classes: Counter[str] = Counter()
    visibility: list[float] = []
    attempts = dropped = 0
    max_attempts = 50 * cfg.n + 50
    while len(visibility) < cfg.n:
        if attempts >= max_attempts:
            raise StageError(
                f"synth {split}: only {len(visibility)} of {cfg.n} frames reached visibility "
                f"{cfg.min_visibility} in {attempts} attempts"
            )
        # About what is still missing (plus a margin for drops), at least one attempt per process,
        # at most a few per process so that results stream to disk.
        missing = cfg.n - len(visibility)
        wanted = min(max(processes, missing + missing // 8), 4 * processes, max_attempts - attempts)
        jobs = [Attempt(split, attempts + i, next(ids)) for i in range(wanted)]
        for frame in run(jobs):
            if len(visibility) == cfg.n:
                break
            attempts += 1
            if not frame.kept:
                dropped += 1
                continue
            # Meshes are written here, for kept frames only: the pool is deterministic, and the
            # dataset then holds exactly the meshes its frames refer to.
            sample_id, model = pool_mesh(cfg.seed, split, frame.class_name, frame.mesh_index)
            _write_mesh_once(mesh_file(cfg.out, SYNSET_BY_CLASS[frame.class_name], sample_id), model)
            for relative, data in frame.files.items():
                write_bytes_atomic(split_dir / relative, data)
            classes[frame.class_name] += 1
            visibility.append(frame.visibility)
            report.ok += 1
    return {
        "frames": len(visibility),
        "attempts": attempts,
        "dropped": dropped,
        "classes": dict(sorted(classes.items())),
        "visibility_min": round(min(visibility), 4),
        "visibility_mean": round(float(np.mean(visibility)), 4),
    }


def synth_code_version() -> str:
    """Version of the code that decides a synthetic dataset's bytes."""
    return code_version(sys.modules[__name__], obman, shapes)


def staged_config(**params: Any) -> SynthConfig:
    """A SynthConfig whose ``out`` is the pipeline's stage directory for these parameters."""
    content = SynthConfig(out=Path("."), **params).content_params()
    return SynthConfig(out=stage_dir("synth", stage_key([], content, synth_code_version())), **content)


def generate(cfg: SynthConfig, processes: int | None = None) -> StageReport:
    """Write a synthetic ObMan dataset under ``cfg.out``; a no-op when the same one is already there.

    Args:
        cfg: Dataset parameters.
        processes: Frame processes, at least 1; None takes settings.synth_processes. Does not change
            the output.
    Returns:
        StageReport: ``ok`` frames written (or ``skipped`` when already complete), per-split stats
        in ``extra``.
    Raises:
        ValueError: ``processes`` is below 1.
        StageError: ``cfg.out`` holds a dataset made with other parameters, or frames keep failing
        the visibility threshold.
    """
    processes = get_settings().synth_processes if processes is None else processes
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    info_path = cfg.out / "synth_info.json"
    content = cfg.content_params()
    digest = params_hash(content)
    version = synth_code_version()
    report = StageReport("synth")
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("params_hash") != digest:
            raise StageError(
                f"{cfg.out} holds a synthetic dataset made with other parameters; choose another --out"
            )
        if info.get("complete") and info.get("code_version") == version:
            report.skipped = sum(s["frames"] for s in info["splits"].values())
            report.extra["splits"] = info["splits"]
            return report
        # An unfinished run, or other code: its frames and meshes may differ from what follows.
        for folder in (*cfg.splits, "shapenet"):  # the same splits: the parameters hash matched
            shutil.rmtree(cfg.out / folder, ignore_errors=True)
    info = {
        "generator": "occ synth",
        "code_version": version,
        "params_hash": digest,
        "params": content,
        "depth_convention": DEPTH_CONVENTION,
        "depth_kind": DEPTH_KIND,
        "pixel_centres": "(i + 0.5, j + 0.5): Blender's grid, pixel (i, j) spans [i, i+1) x [j, j+1)",
        "K": obman.K.tolist(),
        "image_size": [_SIZE, _SIZE],
        "complete": False,
        "splits": {},
    }
    write_json_atomic(info_path, info)
    with Timer() as timer, attempt_runner(cfg, processes) as run:
        for split in cfg.splits:
            info["splits"][split] = _generate_split(cfg, split, run, processes, report)
    info["complete"] = True
    info["seconds"] = round(timer.seconds, 2)
    write_json_atomic(info_path, info)
    report.seconds = timer.seconds
    report.extra["splits"] = info["splits"]
    report.extra["frames_per_second"] = round(report.ok / timer.seconds, 2) if timer.seconds else None
    return report


def _split_names(ctx: click.Context, param: click.Parameter, text: str) -> tuple[str, ...]:
    """Click callback of ``--splits``: comma-separated split names, each checked by occ_core.splits."""
    try:
        return tuple(check_split(name) for name in text.split(","))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _parse_weights(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"expected class=weight, got {item!r}", param_hint="--class-weights"
            ) from None
    return weights


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help=field_help(SynthConfig, "out"))
@click.option(
    "--n",
    type=int,
    default=SynthConfig.model_fields["n"].default,
    show_default=True,
    help=field_help(SynthConfig, "n"),
)
@click.option(
    "--seed",
    type=int,
    default=SynthConfig.model_fields["seed"].default,
    show_default=True,
    help=field_help(SynthConfig, "seed"),
)
@click.option(
    "--splits",
    default=",".join(SPLITS),
    show_default=True,
    callback=_split_names,
    help="comma-separated " + field_help(SynthConfig, "splits"),
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    help="frame processes (default: OCC_SYNTH_PROCESSES, every core)",
)
@click.option("--class-weights", default=None, help="e.g. jar=2720,bottle=2390 (default: the 10K priors)")
def cli(
    out: Path, n: int, seed: int, splits: tuple[str, ...], processes: int | None, class_weights: str | None
) -> None:
    """Generate a synthetic ObMan-format dataset."""
    params: dict[str, Any] = {"out": out, "n": n, "seed": seed, "splits": splits}
    weights = _parse_weights(class_weights)
    if weights is not None:
        params["class_weights"] = weights
    try:
        cfg = SynthConfig(**params)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    report = generate(cfg, processes)
    click.echo("  ".join(f"{k}={v}" for k, v in report.summary().items() if k != "splits"))
    for split, stats in report.extra["splits"].items():
        click.echo(f"  {split}: " + "  ".join(f"{k}={v}" for k, v in stats.items()))


if __name__ == "__main__":
    cli()
