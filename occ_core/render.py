"""Render object meshes the way MOHO's views look: the input camera without the hand, plus orbit views.

    python -m occ_core.render --jobs jobs.jsonl --out .occ/render/manual --views 8 --size 256

``jobs.jsonl`` holds one object per line: ``sample_id``, ``split`` (a name such as ``test``, never a
path: occ_core.splits), ``mesh_path``, ``obj_to_cam`` (4x4, OpenCV camera) and, optionally,
``image_path`` (the input photo, shown in the contact sheet).

What comes out, per job, in the output directory:

- view 0, from the input camera: ``{id}_0_obman_{split}_rgb_{id}.jpg.png`` (MOHO's name, so existing
  tools read it), and ``views`` orbit views ``{id}_{v}_obman_{split}_rgb_{id}.jpg.png``;
- RGB PNGs on a black background, 256x256 by default, intrinsics fx = fy = 480, cx = cy = 128 scaled to
  the size (ObMan's fixed camera). Pixels follow Blender, which rendered ObMan: pixel (i, j) spans
  [i, i+1) x [j, j+1), so (cx, cy) is the image centre and a render lines up with the photo.

Shading is flat and unlit: each pixel is the mesh's interpolated vertex colour. The depth-fallback meshes
take their colours from the photo, so view 0 then reproduces the visible object as photographed,
without the hand, which is what MOHO's renders show.

Orbit views look at the object-frame origin (the object centre in ObMan's normalised frame) from the
input camera's distance, on rings at ``elevations_deg`` above (+) or below (-) the input camera, with
azimuths spread evenly about the input camera's vertical axis.

Throughput (anchors.md section 5): renderer processes run in parallel, each keeping one offscreen
context, and each hands its images to encoder threads, so PNG encoding runs beside the rasteriser
rather than after it. Threads suffice there: the encoder (numpy and zlib) releases the GIL, and no image
is copied between processes. PNGs use the 'Up' filter on every row and a fast zlib level, which is about
twice as fast as PIL at the same level and about as small on renders.

Backends are chosen by name (``get_renderer``). Only pyrender ships: pytorch3d has no Linux wheel and no
source package on the registry (docs/env-feasibility.md section 3); a backend for it is one class with
``name`` and ``render`` added to ``BACKENDS``.

Re-running is idempotent by skipping: a job whose view files all exist is skipped, because every file is
written atomically (so an existing one is complete) and the caller's stage directory is keyed by the
output-relevant config (``RenderConfig.cache_params``), so an existing file is the same output.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Protocol

import click
import numpy as np
import trimesh
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from occ_core.config import configure_offscreen_gl, field_help, get_settings
from occ_core.errors import BadSample, StageError
from occ_core.fsio import atomic_path, write_bytes_atomic
from occ_core.splits import check_split
from occ_core.stage import StageReport, Timer
from occ_core.workers import spawn_pool

OBMAN_SIZE = 256
OBMAN_FOCAL = 480.0
# OpenCV camera (x right, y down, z forward) <-> OpenGL camera (x right, y up, z backward).
CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_FILTER_UP = 2
# Encoded images waiting per encoder thread: enough to keep it busy, few enough to bound memory when
# the renderer outruns the encoder (a 512^2 image is 0.75 MiB).
QUEUE_PER_ENCODER = 8


class RenderConfig(BaseModel):
    """Render-stage settings. Defaults follow MOHO's views: 256 px, ObMan intrinsics, black background."""

    model_config = ConfigDict(frozen=True)

    size: int = Field(OBMAN_SIZE, ge=16, description="square image side in pixels")
    views: int = Field(
        8, ge=0, description="orbit views besides view 0 (the input camera); 0 renders view 0 only"
    )
    elevations_deg: tuple[float, ...] = Field(
        (30.0, -30.0),
        min_length=1,
        description="orbit rings, degrees above (+) or below (-) the input camera; views are shared among "
        "the rings and spread evenly in azimuth on each",
    )
    backend: str = Field("pyrender", description="renderer backend by name (see occ_core.render.BACKENDS)")
    processes: int = Field(
        default_factory=lambda: get_settings().processes,
        ge=1,
        description="renderer processes, each with its own offscreen context (default: OCC_PROCESSES)",
    )
    encode_threads: int = Field(1, ge=1, description="PNG encoder threads per renderer process")
    png_level: int = Field(1, ge=0, le=9, description="zlib level of the PNGs: 1 is fast, 9 is small")

    @field_validator("elevations_deg")
    @classmethod
    def _elevations_below_the_poles(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not -90.0 < e < 90.0 for e in value):
            raise ValueError(f"elevations_deg must lie strictly between -90 and 90, got {list(value)}")
        return value

    def cache_params(self) -> dict[str, Any]:
        """The settings that change the output files; hash these for the stage key, not the whole model."""
        return self.model_dump(mode="json", exclude={"processes", "encode_threads"})


def intrinsics(size: int = OBMAN_SIZE) -> np.ndarray:
    """ObMan's camera matrix (fx = fy = 480, cx = cy = 128 at 256 px) scaled to ``size`` pixels."""
    scale = size / OBMAN_SIZE
    centre = OBMAN_SIZE / 2 * scale
    return np.array([[OBMAN_FOCAL * scale, 0.0, centre], [0.0, OBMAN_FOCAL * scale, centre], [0.0, 0.0, 1.0]])


def ring_azimuths(n: int, elevations_deg: Sequence[float]) -> list[tuple[float, float]]:
    """(elevation, azimuth) in degrees for ``n`` orbit views shared among the rings, first rings first.

    Odd rings are turned by half a step so that two rings do not look from the same azimuths.
    """
    rings = len(elevations_deg)
    angles = []
    for index, elevation in enumerate(elevations_deg):
        count = n // rings + (index < n % rings)
        offset = 0.5 * (index % 2)
        angles += [(elevation, 360.0 * (k + offset) / count) for k in range(count)]
    return angles


def _look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """4x4 transform from the reference camera frame to an OpenCV camera at ``eye`` looking at ``target``."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    rotation = np.stack([right, np.cross(forward, right), forward])  # rows: x right, y down, z forward
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rotation, -rotation @ eye
    return pose


def orbit_poses(
    obj_to_cam: np.ndarray, n: int, elevations_deg: Sequence[float] = (30.0, -30.0)
) -> list[np.ndarray]:
    """View 0 (``obj_to_cam`` itself) and ``n`` orbit views of the object centre, all OpenCV cameras.

    Every orbit camera sits at the input camera's distance from the object centre (the object-frame
    origin) and looks at it, so the centre projects to the principal point; "up" is the input camera's.

    Args:
        obj_to_cam: 4x4 object-to-camera transform of the input view (OpenCV convention).
        n: Number of orbit views.
        elevations_deg: Orbit rings (see ``ring_azimuths``).
    Returns:
        ``1 + n`` object-to-camera transforms, view 0 first.
    Raises:
        ValueError: The object centre is at the camera, or straight above or below it.
    """
    obj_to_cam = np.asarray(obj_to_cam, dtype=np.float64)
    centre = obj_to_cam[:3, 3]  # the object origin in the input camera frame
    distance = float(np.linalg.norm(centre))
    back = -centre / distance if distance > 0 else centre
    side = np.cross(np.array([0.0, -1.0, 0.0]), back)  # the input camera's up is -y
    if distance == 0 or np.linalg.norm(side) < 1e-9:
        raise ValueError(
            f"cannot orbit: the object centre {centre.tolist()} is at, above or below the camera"
        )
    side /= np.linalg.norm(side)
    level_up = np.cross(back, side)  # the input camera's up, made orthogonal to the line of sight
    poses = [obj_to_cam.copy()]
    for elevation, azimuth in ring_azimuths(n, elevations_deg):
        el, az = np.radians(elevation), np.radians(azimuth)
        direction = np.cos(el) * (np.cos(az) * back + np.sin(az) * side) + np.sin(el) * level_up
        # level_up, not the input up, keeps the look-at well defined for any |elevation| < 90.
        poses.append(_look_at(centre + distance * direction, centre, level_up) @ obj_to_cam)
    return poses


def view_filename(sample_id: str, split: str, view: int) -> str:
    """MOHO's output name for one view: ``{id}_{view}_obman_{split}_rgb_{id}.jpg.png``."""
    return f"{sample_id}_{view}_obman_{split}_rgb_{sample_id}.jpg.png"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG: every row 'Up'-filtered, then zlib at ``level``.

    Renders are smooth top to bottom, so one fixed filter compresses about as well as PIL's per-row
    choice at a fraction of the cost; numpy and zlib release the GIL, so encoder threads run in parallel.
    """
    height, width, _ = rgb.shape
    rows = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(height, width * 3)
    filtered = np.empty((height, 1 + width * 3), dtype=np.uint8)
    filtered[:, 0] = PNG_FILTER_UP
    filtered[0, 1:] = rows[0]  # the row above the first one counts as zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), level))
        + _png_chunk(b"IEND", b"")
    )


class Renderer(Protocol):
    """A rasteriser of one coloured mesh; implementations keep their context between calls."""

    name: str

    def render(
        self, mesh: trimesh.Trimesh, obj_to_cam: np.ndarray, K: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return rgb (size, size, 3) uint8 on black, depth (size, size) float32 planar z in m (0 = empty)."""
        ...


class PyrenderRenderer:
    """pyrender offscreen (EGL or OSMesa), flat vertex colours (texture colours sampled at the vertices),
    no back-face culling, one GL context reused for every call.

    The mesh's GPU buffers are kept while the same Trimesh object is rendered again, so the views of one
    mesh cost one upload. A context belongs to the thread that made it: use one instance per thread.
    """

    name = "pyrender"

    def __init__(self) -> None:
        # Before any import of pyrender or PyOpenGL, which read the GL platform and pyglet's headless
        # flag when first imported: without them pyglet loads X11, which GPU hosts often lack.
        configure_offscreen_gl()
        self._offscreen: Any = None
        self._scene: Any = None
        self._camera_node: Any = None
        self._mesh: trimesh.Trimesh | None = None
        self._mesh_node: Any = None
        self._mesh_extent: tuple[np.ndarray, float] = (np.zeros(3), 0.0)

    def _open(self, size: int) -> None:
        try:
            import pyrender

            self._offscreen = pyrender.OffscreenRenderer(size, size)
        except Exception as exc:
            raise StageError(
                f"pyrender cannot open an offscreen GL context (PYOPENGL_PLATFORM="
                f"{os.environ['PYOPENGL_PLATFORM']}; install Mesa EGL or OSMesa, or set OCC_GL_PLATFORM): "
                f"{exc}"
            ) from exc
        self._scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0], ambient_light=[0.0, 0.0, 0.0])
        self._camera_node = self._scene.add(pyrender.IntrinsicsCamera(1.0, 1.0, 0.0, 0.0))
        self._mesh = self._mesh_node = None  # buffers belong to a context: upload again in a new one

    def _show(self, mesh: trimesh.Trimesh) -> None:
        import pyrender

        if self._mesh_node is not None:
            self._scene.remove_node(self._mesh_node)  # pyrender frees its buffers on the next render
        visual = mesh.visual.to_color() if mesh.visual.kind == "texture" else mesh.visual
        # Flat shading needs no normals, so build the primitive directly: Mesh.from_trimesh computes them
        # (5 ms on an 8k-face mesh, as long as rendering it) and refuses face colours with shared vertices.
        primitive = pyrender.Primitive(
            positions=mesh.vertices,
            indices=mesh.faces,
            color_0=visual.vertex_colors,
            mode=pyrender.constants.GLTF.TRIANGLES,
        )
        self._mesh_node = self._scene.add(pyrender.Mesh([primitive]))
        lo, hi = mesh.bounds
        self._mesh = mesh
        self._mesh_extent = ((lo + hi) / 2, float(np.linalg.norm(hi - lo)) / 2)

    def render(
        self, mesh: trimesh.Trimesh, obj_to_cam: np.ndarray, K: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        from OpenGL.error import Error as GLError

        try:
            return self._draw(mesh, obj_to_cam, K, size)
        except GLError:
            # Any other OffscreenRenderer.delete() in this process calls eglTerminate on the display all
            # EGL contexts share (pyrender 0.1.45, platforms/egl.py delete_context), which kills ours
            # too: open a new context, once; a second failure is a real one.
            self._offscreen = None
            return self._draw(mesh, obj_to_cam, K, size)

    def _draw(
        self, mesh: trimesh.Trimesh, obj_to_cam: np.ndarray, K: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        import pyrender

        if self._offscreen is None:
            self._open(size)
        elif self._offscreen.viewport_width != size:
            self._offscreen.viewport_width = self._offscreen.viewport_height = size
        if mesh is not self._mesh:
            self._show(mesh)
        camera = self._camera_node.camera
        camera.fx, camera.fy, camera.cx, camera.cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        # Clip planes hug the mesh's bounding sphere, so the 24-bit depth buffer keeps its precision.
        centre, radius = self._mesh_extent
        distance = float(np.linalg.norm(obj_to_cam[:3, :3] @ centre + obj_to_cam[:3, 3]))
        camera.znear = max((distance - radius) * 0.5, distance * 1e-3, 1e-4)
        camera.zfar = (distance + radius) * 2.0
        self._scene.set_pose(self._camera_node, np.linalg.inv(obj_to_cam) @ CV_TO_GL)
        # Both faces of every triangle: reconstructions may be open (front-only) or inconsistently wound.
        flags = pyrender.RenderFlags.FLAT | pyrender.RenderFlags.SKIP_CULL_FACES
        rgb, depth = self._offscreen.render(self._scene, flags=flags)
        return rgb, depth


BACKENDS: dict[str, Callable[[], Renderer]] = {"pyrender": PyrenderRenderer}


def get_renderer(name: str) -> Renderer:
    """A new renderer of the named backend (its GL context opens on the first render).

    Raises:
        StageError: No backend has that name; the message lists the available ones.
    """
    if name not in BACKENDS:
        raise StageError(
            f"unknown render backend {name!r}; available: {', '.join(BACKENDS)} "
            "(pytorch3d is not installable here: docs/env-feasibility.md section 3)"
        )
    return BACKENDS[name]()


_thread_state = threading.local()


def _thread_renderer(name: str) -> Renderer:
    # One context per thread and backend: GL contexts are bound to the thread that made them current.
    renderers = _thread_state.__dict__.setdefault("renderers", {})
    if name not in renderers:
        renderers[name] = get_renderer(name)
    return renderers[name]


@dataclass(frozen=True)
class RenderJob:
    """One object to render: its mesh (object frame), its input camera pose and, optionally, its photo."""

    sample_id: str
    split: str
    mesh_path: Path
    obj_to_cam: np.ndarray
    image_path: Path | None = None

    def __post_init__(self) -> None:
        check_split(self.split)  # the split goes into file names: a path there would escape out_dir

    def filenames(self, views: int) -> list[str]:
        """Output names of view 0 and ``views`` orbit views."""
        return [view_filename(self.sample_id, self.split, v) for v in range(1 + views)]


def load_mesh(path: Path) -> trimesh.Trimesh:
    """Load a mesh file as one Trimesh, checked for use.

    Raises:
        BadSample: The file is missing or unreadable, has no faces, or has non-finite vertices.
    """
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types (ValueError, KeyError, OSError, ...) on bad files
        raise BadSample(path, f"cannot load mesh: {exc}") from exc
    if not isinstance(mesh, trimesh.Trimesh):
        raise BadSample(path, "mesh has no faces")
    return check_mesh(mesh, path)


def check_mesh(mesh: trimesh.Trimesh, path: Path | str) -> trimesh.Trimesh:
    """Reject a mesh that cannot be rendered: no faces, or vertices that are not finite.

    Raises:
        BadSample: Naming ``path`` and the defect.
    """
    if len(mesh.faces) == 0:
        raise BadSample(path, "mesh has no faces")
    if not np.isfinite(mesh.vertices).all():
        raise BadSample(path, "mesh has non-finite vertices")
    return mesh


def job_poses(job: RenderJob, cfg: RenderConfig) -> list[np.ndarray]:
    """View 0 and the orbit poses of one job.

    Raises:
        BadSample: ``obj_to_cam`` is not a finite 4x4 matrix, or the object centre cannot be orbited.
    """
    pose = np.asarray(job.obj_to_cam, dtype=np.float64)
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        raise BadSample(job.mesh_path, f"obj_to_cam must be a finite 4x4 matrix, got shape {pose.shape}")
    try:
        return orbit_poses(pose, cfg.views, cfg.elevations_deg)
    except ValueError as exc:
        raise BadSample(job.mesh_path, str(exc)) from exc


def _write_png(path: Path, rgb: np.ndarray, level: int) -> None:
    write_bytes_atomic(path, encode_png(rgb, level))


def _render_chunk(
    jobs: Sequence[RenderJob], cfg: RenderConfig, out_dir: Path, overwrite: bool = False
) -> StageReport:
    """Render a list of jobs in this process, encoding and writing PNGs in encoder threads."""
    renderer = _thread_renderer(cfg.backend)
    K = intrinsics(cfg.size)
    report = StageReport("render", extra={"views": 0})
    in_flight: deque[Future[None]] = deque()
    with ThreadPoolExecutor(cfg.encode_threads, thread_name_prefix="png") as encoder:
        for job in jobs:
            names = job.filenames(cfg.views)
            if not overwrite and all((out_dir / name).exists() for name in names):
                report.skipped += 1
                continue
            try:
                mesh = load_mesh(job.mesh_path)
                poses = job_poses(job, cfg)
            except BadSample as exc:
                report.quarantine(job.sample_id, exc.path, exc.reason)
                continue
            for view, (name, pose) in enumerate(zip(names, poses, strict=True)):
                rgb, depth = renderer.render(mesh, pose, K, cfg.size)
                if view == 0 and not depth.any():
                    reason = "view 0 is empty: the mesh is outside the input camera's view"
                    report.quarantine(job.sample_id, job.mesh_path, reason)
                    break
                while len(in_flight) >= QUEUE_PER_ENCODER * cfg.encode_threads:
                    in_flight.popleft().result()
                in_flight.append(encoder.submit(_write_png, out_dir / name, rgb, cfg.png_level))
            else:
                report.ok += 1
                report.extra["views"] += len(names)
        for future in in_flight:
            future.result()  # a failed write (disk full, permissions) fails the shard
    return report


def _split(jobs: Sequence[RenderJob], parts: int) -> list[list[RenderJob]]:
    return [list(jobs[i::parts]) for i in range(parts) if jobs[i::parts]]


_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()


def _renderer_pool(processes: int) -> ProcessPoolExecutor:
    """Renderer processes kept for the life of this process (one pool per size), since starting one costs
    seconds (imports, GL context, shaders). Spawned, not forked, so no GL state is inherited; they exit
    when this process does, even when it is killed (occ_core.workers).
    """
    with _pools_lock:
        if processes not in _pools:
            _pools[processes] = spawn_pool(processes)
        return _pools[processes]


def stop_renderer_processes() -> None:
    """Stop the renderer processes that ``render_jobs`` keeps between calls; the next call starts new ones."""
    with _pools_lock:
        while _pools:
            _pools.popitem()[1].shutdown(wait=True)


def render_jobs(
    jobs: Sequence[RenderJob], cfg: RenderConfig, out_dir: Path, overwrite: bool = False
) -> StageReport:
    """Render view 0 and ``cfg.views`` orbit views of every job into ``out_dir``; bad jobs are quarantined.

    With ``cfg.processes > 1`` the jobs are dealt round-robin to that many renderer processes, started on
    the first call and reused by later ones; each keeps one offscreen context and writes its own PNGs.
    They are spawned, so a script that calls this must guard its entry point with
    ``if __name__ == "__main__":``.

    Args:
        jobs: Objects to render.
        cfg: Render settings (see RenderConfig).
        out_dir: Output directory (the caller's stage directory), created if missing.
        overwrite: Render every job even when its views exist; False skips such jobs, which is right
            only when ``out_dir`` cannot hold views made with other settings or inputs.
    Returns:
        StageReport: ok / skipped (all views already present) / quarantined jobs, and
        ``extra = {"views": views written, "views_per_s": views per wall-clock second}``.
    Raises:
        StageError: Unknown backend, no GL context, a renderer process died, or ``out_dir`` cannot be
            created.
    """
    get_renderer(cfg.backend)  # fail on an unknown name before starting any process
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StageError(f"{out_dir}: cannot create the render output directory: {exc}") from exc
    with Timer() as timer:
        if cfg.processes == 1 or len(jobs) <= 1:
            reports = [_render_chunk(jobs, cfg, out_dir, overwrite)]
        else:
            # Several chunks per process even out meshes of different cost.
            chunks = _split(jobs, cfg.processes * 4)
            try:
                pool = _renderer_pool(cfg.processes)
                reports = list(
                    pool.map(_render_chunk, chunks, repeat(cfg), repeat(out_dir), repeat(overwrite))
                )
            except BrokenProcessPool as exc:
                stop_renderer_processes()
                raise StageError(
                    f"a renderer process died (GL driver crash or out of memory): {exc}"
                ) from exc
    report = StageReport.merge("render", reports)
    report.seconds = timer.seconds
    report.extra["views_per_s"] = report.extra["views"] / timer.seconds if timer.seconds > 0 else 0.0
    return report


def sheet_rows(
    jobs: Sequence[RenderJob], cfg: RenderConfig, out_dir: Path, limit: int = 6
) -> list[tuple[Path, list[Path]]]:
    """Rows for ``contact_sheet``: the first ``limit`` jobs that have a photo and all their renders."""
    candidates = (
        (job.image_path, [out_dir / name for name in job.filenames(cfg.views)])
        for job in jobs
        if job.image_path is not None
    )
    return complete_rows(candidates, limit)


def complete_rows(candidates: Iterable[tuple[Path, list[Path]]], limit: int) -> list[tuple[Path, list[Path]]]:
    """The first ``limit`` (photo, renders) rows whose renders all exist on disk."""
    rows: list[tuple[Path, list[Path]]] = []
    for photo, renders in candidates:
        if len(rows) >= limit:
            break
        if all(path.exists() for path in renders):
            rows.append((photo, renders))
    return rows


def _thumbnail(path: Path, thumb: int) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((thumb, thumb))
    except (OSError, UnidentifiedImageError):
        # A sheet is for looking at; a missing photo shows as a grey tile rather than failing the run.
        return Image.new("RGB", (thumb, thumb), (64, 64, 64))


def contact_sheet(rows: list[tuple[Path, list[Path]]], out_path: Path, thumb: int = 128) -> Path:
    """Write a PNG grid, one row per sample: the input image, then its renders.

    Args:
        rows: (input image, render paths) per sample.
        out_path: Where the PNG goes (written atomically).
        thumb: Side of each square tile in pixels.
    Returns:
        ``out_path``.
    """
    gap = 4
    columns = max((1 + len(renders) for _, renders in rows), default=1)
    sheet = Image.new(
        "RGB", (columns * (thumb + gap) + gap, max(len(rows), 1) * (thumb + gap) + gap), (255, 255, 255)
    )
    for row, (image_path, renders) in enumerate(rows):
        for column, path in enumerate([image_path, *renders]):
            sheet.paste(_thumbnail(path, thumb), (gap + column * (thumb + gap), gap + row * (thumb + gap)))
    with atomic_path(out_path) as tmp:
        sheet.save(tmp, format="PNG")
    return out_path


def read_jobs(path: Path) -> list[RenderJob]:
    """Read render jobs from JSONL (see the module docstring); relative paths are relative to the file.

    Raises:
        StageError: A line is not valid JSON or lacks a field; the message names the line.
    """
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = row.get("image_path")
            jobs.append(
                RenderJob(
                    sample_id=str(row["sample_id"]),
                    split=str(row["split"]),
                    mesh_path=path.parent / row["mesh_path"],
                    obj_to_cam=np.asarray(row["obj_to_cam"], dtype=np.float64),
                    image_path=path.parent / image if image else None,
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StageError(f"{path}:{number}: not a render job ({type(exc).__name__}: {exc})") from exc
    return jobs


@click.command("render")
@click.option(
    "--jobs",
    "jobs_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="JSONL of render jobs (sample_id, split, mesh_path, obj_to_cam, optional image_path).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory for the PNGs, quarantine.jsonl and contact_sheet.png.",
)
@click.option(
    "--size", type=int, default=OBMAN_SIZE, show_default=True, help=field_help(RenderConfig, "size")
)
@click.option("--views", type=int, default=8, show_default=True, help=field_help(RenderConfig, "views"))
@click.option(
    "--elevations",
    default="30,-30",
    show_default=True,
    help=field_help(RenderConfig, "elevations_deg") + " (comma-separated)",
)
@click.option("--backend", default="pyrender", show_default=True, help=field_help(RenderConfig, "backend"))
@click.option(
    "--processes", type=click.IntRange(min=1), default=None, help=field_help(RenderConfig, "processes")
)
@click.option(
    "--encode-threads",
    type=int,
    default=1,
    show_default=True,
    help=field_help(RenderConfig, "encode_threads"),
)
@click.option(
    "--png-level", type=int, default=1, show_default=True, help=field_help(RenderConfig, "png_level")
)
@click.option(
    "--sheet-samples", type=int, default=6, show_default=True, help="Samples in the contact sheet (0: none)."
)
def cli(
    jobs_path: Path,
    out_dir: Path,
    size: int,
    views: int,
    elevations: str,
    backend: str,
    processes: int | None,
    encode_threads: int,
    png_level: int,
    sheet_samples: int,
) -> None:
    """Render view 0 and orbit views of every job in JOBS into OUT, then print the stage summary."""
    chosen = {"processes": processes} if processes is not None else {}
    try:
        cfg = RenderConfig(
            size=size,
            views=views,
            elevations_deg=tuple(float(e) for e in elevations.split(",")),
            backend=backend,
            encode_threads=encode_threads,
            png_level=png_level,
            **chosen,
        )
    except ValueError as exc:  # also pydantic.ValidationError
        raise click.UsageError(str(exc)) from exc
    try:
        jobs = read_jobs(jobs_path)
        report = render_jobs(jobs, cfg, out_dir)
    except StageError as exc:
        raise click.ClickException(str(exc)) from exc
    report.write_quarantine(out_dir)
    rows = sheet_rows(jobs, cfg, out_dir, sheet_samples)
    if rows:
        contact_sheet(rows, out_dir / "contact_sheet.png")
    click.echo(json.dumps(report.summary()))


if __name__ == "__main__":
    cli()
