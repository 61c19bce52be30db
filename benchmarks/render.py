r"""Rendering throughput: views per second written to disk as PNG, ``render_jobs`` against a plain loop.

    python -m benchmarks.render [--n-meshes 40 --views 9 --sizes 256,512 --processes 1,2 --backends pyrender]

The peer is what one would write first: one process, one pyrender ``OffscreenRenderer``, a scene per
mesh, ``render`` and ``PIL.Image.save`` (default compression) per view. Ours is ``occ_core.render.
render_jobs``: renderer processes in parallel, PNGs encoded in threads beside the renderer at a fast zlib
level. Both render the same meshes (the synthetic ObMan class meshes, 3k-16k faces, 0.2 m across, at
0.5-0.8 m), from the same poses (view 0 plus ``--views`` orbit views), at the same size, and both time
everything from mesh file to PNG on disk. Ours is timed twice per setting: "cold" includes starting the
renderer processes (a fresh worker's first shard), "warm" reuses them (every later shard). A short
split (rendering alone, encoding alone) says where the time goes.

GPU host (EGL on the NVIDIA driver). The machine needs the GL dispatch libraries (Debian: libegl1,
libglvnd0, libopengl0, libgl1) and, in its Python, pyrender, trimesh, PyOpenGL 3.1.10 (over pyrender's
pin, with --no-deps), pyglet and pydantic-settings; pyglet runs headless (set by
occ_core.config.configure_offscreen_gl). Then, from the repository root:

    export PYOPENGL_PLATFORM=egl
    python -m benchmarks.render --n-meshes 300 --views 9 --sizes 256,512 --processes 1,4,8,16 \
        --markdown render.md

If NVIDIA's EGL vendor file is not found, point __EGL_VENDOR_LIBRARY_FILENAMES at its
10_nvidia.json. The PNGs go to a temporary directory; the figures of the H200 run are in
benchmarks/RESULTS.md under ``## render``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from occ_core.classes import QA_CLASSES
from occ_core.config import configure_offscreen_gl
from occ_core.render import (
    CV_TO_GL,
    RenderConfig,
    RenderJob,
    encode_png,
    get_renderer,
    intrinsics,
    orbit_poses,
    render_jobs,
    stop_renderer_processes,
    view_filename,
)
from occ_core.shapes import class_mesh
from occ_core.workers import spawn_pool

OBJECT_DIAGONAL_M = 0.2  # ObMan's ShapeNet objects are hand-held, about 0.1-0.3 m across


def make_jobs(n_meshes: int, work: Path, seed: int = 0) -> list[RenderJob]:
    """Write ``n_meshes`` class meshes as PLY and pose each in front of the camera, as ObMan does."""
    rng = np.random.default_rng(seed)
    jobs = []
    for index in range(n_meshes):
        mesh = class_mesh(QA_CLASSES[index % len(QA_CLASSES)], rng)
        mesh.apply_scale(OBJECT_DIAGONAL_M)
        path = work / "meshes" / f"{index:08d}.ply"
        path.parent.mkdir(parents=True, exist_ok=True)
        mesh.export(path)
        pose = trimesh.transformations.random_rotation_matrix(rand=rng.random(3))
        depth = rng.uniform(0.5, 0.8)
        pose[:3, 3] = [rng.uniform(-0.08, 0.08) * depth, rng.uniform(-0.08, 0.08) * depth, depth]
        jobs.append(RenderJob(f"{index:08d}", "test", path, pose))
    return jobs


def peer_loop(jobs: list[RenderJob], size: int, views: int, out_dir: Path) -> float:
    """The plain loop: one OffscreenRenderer, a scene per mesh, PIL's default PNG save per view.

    Returns views per second, timed from opening the renderer to the last file written.
    """
    configure_offscreen_gl()
    import pyrender

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    renderer = pyrender.OffscreenRenderer(size, size)
    K = intrinsics(size)
    written = 0
    for job in jobs:
        mesh = trimesh.load(job.mesh_path, force="mesh", process=False)
        scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0])
        scene.add(pyrender.Mesh.from_trimesh(mesh))
        camera = scene.add(
            pyrender.IntrinsicsCamera(K[0, 0], K[1, 1], K[0, 2], K[1, 2], znear=0.05, zfar=5.0)
        )
        for view, pose in enumerate(orbit_poses(job.obj_to_cam, views)):
            scene.set_pose(camera, np.linalg.inv(pose) @ CV_TO_GL)
            rgb, _ = renderer.render(scene, flags=pyrender.RenderFlags.FLAT)
            Image.fromarray(rgb).save(out_dir / view_filename(job.sample_id, job.split, view))
            written += 1
    seconds = time.perf_counter() - start
    renderer.delete()
    return written / seconds


def run_peer(jobs: list[RenderJob], size: int, views: int, out_dir: Path) -> float:
    """``peer_loop`` in a process of its own: its renderer's delete() ends every EGL context of a process."""
    with spawn_pool(1) as pool:
        return pool.submit(peer_loop, jobs, size, views, out_dir).result()


def time_ours(jobs: list[RenderJob], cfg: RenderConfig, out_dir: Path) -> float:
    """Views per second of one ``render_jobs`` call, as its caller sees it."""
    start = time.perf_counter()
    views = render_jobs(jobs, cfg, out_dir).extra["views"]
    return views / (time.perf_counter() - start)


def measure_split(jobs: list[RenderJob], size: int, views: int) -> str:
    """Rendering alone, then encoding alone, one thread each: where the time of one view goes."""
    renderer = get_renderer("pyrender")  # sets up headless GL, which PyOpenGL reads when first imported
    from OpenGL.GL import GL_RENDERER, glGetString

    K = intrinsics(size)
    images = []
    start = time.perf_counter()
    for job in jobs:
        mesh = trimesh.load(job.mesh_path, force="mesh", process=False)
        images += [renderer.render(mesh, pose, K, size)[0] for pose in orbit_poses(job.obj_to_cam, views)]
    render_only = len(images) / (time.perf_counter() - start)
    gl_name = glGetString(GL_RENDERER).decode()  # the context the renderer just made current
    start = time.perf_counter()
    for rgb in images:
        encode_png(rgb, 1)
    ours = len(images) / (time.perf_counter() - start)
    start = time.perf_counter()
    for rgb in images:
        Image.fromarray(rgb).save(io.BytesIO(), format="PNG")
    pil = len(images) / (time.perf_counter() - start)
    return (
        f"GL_RENDERER {gl_name!r}; at {size} px, one thread: pyrender render {render_only:.0f} views/s, "
        f"encode_png level 1 {ours:.0f} img/s, PIL PNG default {pil:.0f} img/s"
    )


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-meshes", type=int, default=40, help="meshes rendered by each contender")
    parser.add_argument("--views", type=int, default=9, help="orbit views per mesh besides view 0")
    parser.add_argument("--sizes", default="256,512", help="image sides, comma-separated")
    parser.add_argument("--processes", default="1,2", help="renderer processes for ours, comma-separated")
    parser.add_argument("--backends", default="pyrender", help="render backends for ours, comma-separated")
    parser.add_argument("--png-level", type=int, default=1, help="zlib level of our PNGs")
    parser.add_argument("--repeats", type=int, default=1, help="runs per figure; the best is kept")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="occ-bench-render-"))
    jobs = make_jobs(args.n_meshes, work)
    faces = [len(trimesh.load(job.mesh_path, force="mesh", process=False).faces) for job in jobs]
    lines = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    split = measure_split(jobs[:8], 256, args.views)  # also opens the first context, setting the platform
    platform_name = os.environ.get("PYOPENGL_PLATFORM")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    emit(f"host: {platform.node()}, {os.cpu_count()} CPUs (load {load}), PYOPENGL_PLATFORM={platform_name}")
    emit(
        f"work: {len(jobs)} meshes x {1 + args.views} views = {len(jobs) * (1 + args.views)} PNGs per run, "
        f"{min(faces)}-{max(faces)} faces (mean {np.mean(faces):.0f})"
    )
    emit(split)
    emit()
    emit("| backend | size | processes | peer views/s | ours cold | ours warm | warm / peer | cold / peer |")
    emit("|---|---|---|---|---|---|---|---|")
    for size in parse_ints(args.sizes):
        peer = max(run_peer(jobs, size, args.views, work / f"peer-{size}-{r}") for r in range(args.repeats))
        for backend in args.backends.split(","):
            for processes in parse_ints(args.processes):
                cfg = RenderConfig(
                    size=size,
                    views=args.views,
                    backend=backend,
                    processes=processes,
                    png_level=args.png_level,
                )
                cold, warm = 0.0, 0.0
                for r in range(args.repeats):
                    stop_renderer_processes()  # "cold" starts them inside the timing
                    name = f"ours-{backend}-{size}-{processes}-{r}"
                    cold = max(cold, time_ours(jobs, cfg, work / f"{name}-cold"))
                    warm = max(warm, time_ours(jobs, cfg, work / f"{name}-warm"))
                emit(
                    f"| {backend} | {size} | {processes} | {peer:.0f} | {cold:.0f} | {warm:.0f} "
                    f"| {warm / peer:.2f}x | {cold / peer:.2f}x |"
                )
    stop_renderer_processes()
    emit(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
