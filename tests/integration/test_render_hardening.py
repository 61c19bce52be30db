"""Renderer processes and entry points, hardened: workers die with their parent; every entry point sets up
headless GL before pyrender (or PyOpenGL) is imported; the render flow and the demo take split names only.

    .venv/bin/python -m pytest tests/integration/test_render_hardening.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from click.testing import CliRunner
from pydantic import ValidationError

pytestmark = pytest.mark.integration

OCC = str(Path(sys.executable).with_name("occ"))
REPO = Path(__file__).resolve().parents[2]
GL_VARIABLES = ("PYGLET_HEADLESS", "PYOPENGL_PLATFORM")


# --- split names in the flow and the demo --------------------------------------------------------------


def test_the_render_flow_command_refuses_a_split_path(tmp_path):
    from flows.render import cli

    result = CliRunner().invoke(cli, ["--root", str(tmp_path), "--split", "../r30/test"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'--split'" in result.output and "split must be a name" in result.output


def test_the_demo_refuses_a_split_path():
    from flows.demo import DemoConfig

    with pytest.raises(ValidationError, match="split must be a name"):
        DemoConfig(splits=("train", "../r30/test"))
    assert DemoConfig(splits=("r30",)).splits == ("r30",)


# --- workers die with their parent -------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (every thread's list)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


def two_workers(pid: int) -> list[int] | None:
    """Two spawned worker processes of ``pid``, once it has them."""
    workers = [child for child in children(pid) if is_worker(child)]
    return workers[:2] if len(workers) >= 2 else None


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for PID 1 to reap it has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for(condition, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()


@pytest.mark.parametrize(
    "argv",
    [
        lambda root, out: [
            "render",
            "--root",
            str(root),
            "--split",
            "test",
            "--views",
            "8",
            "--out",
            str(out),
        ],
        lambda root, out: ["synth", "--out", str(out), "--n", "40", "--splits", "test"],
    ],
    ids=["render", "synth"],
)
def test_sigkill_of_the_parent_leaves_no_worker_behind(tiny_obman, tmp_path, argv):
    parent = subprocess.Popen(
        [OCC, *argv(tiny_obman, tmp_path / "out"), "--processes", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        workers = wait_for(lambda: two_workers(parent.pid), 240) or []
        assert len(workers) == 2, "the command never started its 2 renderer processes"
        parent.kill()
        parent.wait()
        gone = wait_for(lambda: not any(alive(w) for w in workers), 10)
        assert gone, f"renderer processes outlived their parent: {[w for w in workers if alive(w)]}"
    finally:
        parent.kill()
        parent.wait()
        for worker in workers:
            if alive(worker):
                os.kill(worker, signal.SIGKILL)


def test_a_pool_started_from_a_thread_that_ended_keeps_working(tmp_path):
    """Workers must die with the parent *process*: a finished Prefect task thread is not the parent."""
    import threading

    from occ_core.render import RenderConfig, RenderJob, render_jobs, stop_renderer_processes

    mesh = trimesh.creation.box(extents=[0.1] * 3)
    mesh.export(tmp_path / "cube.ply")
    pose = np.eye(4)
    pose[2, 3] = 0.5
    jobs = [RenderJob(f"{i:08d}", "test", tmp_path / "cube.ply", pose) for i in range(4)]
    cfg = RenderConfig(size=32, views=0, processes=2)
    thread = threading.Thread(target=render_jobs, args=(jobs, cfg, tmp_path / "first"))
    thread.start()
    thread.join()
    time.sleep(1.0)  # time for a worker that wrongly dies with the thread to go
    try:
        assert render_jobs(jobs, cfg, tmp_path / "second").ok == len(jobs)
    finally:
        stop_renderer_processes()


# --- headless GL before pyrender, on every entry point -----------------------------------------------

# Records the GL variables when pyrender or PyOpenGL is first imported: the import of either reads them.
WATCH = """
import atexit, json, os, sys
seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("pyrender", "OpenGL") and name not in seen:
            seen[name] = {k: os.environ.get(k) for k in ("PYGLET_HEADLESS", "PYOPENGL_PLATFORM")}
        return None
sys.meta_path.insert(0, Watch())
atexit.register(lambda: print("WATCH " + json.dumps(seen)))
"""


def cube_jobs_file(work: Path) -> Path:
    mesh = trimesh.creation.box(extents=[0.1] * 3)
    mesh.export(work / "cube.ply")
    pose = np.eye(4)
    pose[2, 3] = 0.5
    row = {"sample_id": "00000001", "split": "test", "mesh_path": "cube.ply", "obj_to_cam": pose.tolist()}
    (work / "jobs.jsonl").write_text(json.dumps(row) + "\n")
    return work / "jobs.jsonl"


ENTRY_POINTS = {
    "occ render": """
        sys.argv = ["occ", "render", "--root", ROOT, "--split", "test", "--limit", "1", "--views", "1",
                    "--size", "32", "--processes", "1", "--out", OUT]
        from occ_core.cli import main
        main()
    """,
    "python -m occ_core.render": """
        import runpy
        sys.argv = ["occ_core.render", "--jobs", JOBS, "--out", OUT, "--views", "1", "--size", "32",
                    "--processes", "1"]
        runpy.run_module("occ_core.render", run_name="__main__", alter_sys=True)
    """,
    "python -m benchmarks.render": """
        import runpy
        sys.argv = ["benchmarks.render", "--n-meshes", "1", "--views", "0", "--sizes", "32",
                    "--processes", "1", "--out", OUT]
        runpy.run_module("benchmarks.render", run_name="__main__", alter_sys=True)
    """,
    "render flow task": """
        from pathlib import Path
        from moho_bridge.pipeline import RenderParams, plan_render
        from tasks.render import render_shard
        params = RenderParams(root=Path(ROOT), split="test", limit=1, views=1, size=32, processes=1,
                              out=Path(OUT))
        plan = plan_render(params)
        assert render_shard.fn(plan.shards[0], params, plan.views_dir).ok == 1
    """,
    "synth": """
        from pathlib import Path
        from occ_core.synth import SynthConfig, generate
        assert generate(SynthConfig(out=Path(OUT), n=1, splits=("test",)), processes=1).ok == 1
    """,
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_sets_headless_gl_before_importing_pyrender(tiny_obman, tmp_path, entry):
    names = (
        f"ROOT, OUT, JOBS = {str(tiny_obman)!r}, {str(tmp_path / 'out')!r}, {str(cube_jobs_file(tmp_path))!r}"
    )
    code = WATCH + names + "\n" + textwrap.dedent(ENTRY_POINTS[entry])
    env = {k: v for k, v in os.environ.items() if k not in GL_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.rsplit("WATCH ", 1)[1])
    assert set(seen) == {"pyrender", "OpenGL"}, f"{entry} did not render: {seen}"
    for module, variables in seen.items():
        assert variables["PYGLET_HEADLESS"] == "1" and variables["PYOPENGL_PLATFORM"], (module, variables)
    assert list((tmp_path / "out").rglob("*.png")), f"{entry} wrote no image"
