"""``moho`` backend: the real MOHO (CVPR 2024), run as a subprocess in its own environment.

MOHO needs its own interpreter (python 3.9, torch with pytorch3d, manopth and the licence-gated MANO
model), so it never shares occ's. This module follows docs/obman-moho.md C2 step by step:

- discovery: ``MOHO_HOME`` (a checkout with OCC-MLLM's ``recontruct_3Dimage.py`` and modified
  ``models/obman_dataset_ddp_dino.py``, plus ``externals/mano/MANO_RIGHT.pkl``), ``MOHO_PYTHON``,
  ``MOHO_CKPT``, from the constructor's arguments or the environment;
- probe: imports MOHO's dependencies with ``MOHO_PYTHON`` under a timeout and says why it cannot run;
- staging, in a scratch directory W outside MOHO_HOME: symlinked inputs under
  ``W/data/obman/{split}/{rgb,segm,meta}`` (the path tail gives MOHO's output names,
  ``{id}_0_obman_{split}_rgb_{id}.jpg.png``), the hand cache built inside MOHO's env, the list file
  ``W/cache/obman_view_test_all.txt``, ``W/moho.conf`` (the upstream conf plus the single-view
  overrides), the checkpoint link ``W/exp/ckpt_SOMVideo_pre.pth`` and ``W/externals``;
- run: ``test_image`` then ``test_mesh_single`` with W as working directory, a wall-clock timeout,
  stdout and stderr in ``W/logs/{step}.log``, the GPU chosen through ``CUDA_VISIBLE_DEVICES``;
- collection: each view must decode to 256x256x3 and not be blank, each mesh must have faces;
- provenance: MOHO commit, checkpoint sha256, conf hash.

What it protects against: a missing or broken install (the probe says which part, before any run);
a hung run (timeout, then the whole process group is killed, DataLoader workers included); OCC's
runner hard-coding ``CUDA_VISIBLE_DEVICES=0,1,2`` at import (the launcher in in_moho_env.py pins the
bridge's choice); MOHO's relative paths (``cache/``, ``externals/``); outputs that are missing, blank
or face-less (the sample fails, naming the file). What it does not: memory limits, MOHO's numerical
correctness, or the privilege of its inputs: like OCC, MOHO gets the ground-truth pose and hand from
meta and the amodal object mask (segm channel 2), and the RGB image stands in for DINO features.

    MOHO_HOME=... MOHO_PYTHON=... MOHO_CKPT=... \
        occ reconstruct --root ROOT --split test --backend moho --out OUT
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from moho_bridge.protocol import ReconResult, pose_floats
from occ_core.errors import BadSample, StageError
from occ_core.fsio import atomic_path, sha256_bytes, sha256_file, write_text_atomic
from occ_core.obman import IMAGE_SIZE, SampleRef, load_meta, object_to_camera, read_rgb, read_segm
from occ_core.render import load_mesh
from occ_core.stage import Timer

ENV_VARS = ("MOHO_HOME", "MOHO_PYTHON", "MOHO_CKPT")
RUNNER = "recontruct_3Dimage.py"  # OCC-MLLM's spelling
PROBE_CODE = (
    "import torch, pytorch3d, manopth, mcubes, pyhocon, pytorch_lightning; print(torch.cuda.is_available())"
)
BASE_CONF = "confs/moo_wmask_dp_hand.conf"
MANO_MODEL = "externals/mano/MANO_RIGHT.pkl"
CHECKPOINT_NAME = "ckpt_SOMVideo_pre.pth"  # the name OCC's runner loads from general.base_exp_dir
LIST_FILE = "cache/obman_view_test_all.txt"  # hard-coded in the runner, relative to its cwd
VIEW_DIR = "views_fine_test"
MESH_DIRS = ("meshes_test2", "meshes_test")  # OCC's runner, then upstream's
CASE = "bridge"
STEPS = ("prep", "test_image", "test_mesh_single")
# OCC's MultiObjectObmanDataset_Single keeps scene indices 0..7000 only; larger batches are split.
MAX_SCENES_PER_RUN = 7000
IN_MOHO_ENV = Path(__file__).with_name("in_moho_env.py")
INPUT_NOTE = (
    "inputs as in OCC: ground-truth object pose and hand (from meta), amodal object mask "
    "(segm channel 2), the RGB image in place of DINO features"
)


@dataclass(frozen=True)
class MohoInstall:
    """Where MOHO lives: its checkout, its interpreter, its checkpoint (None when not configured)."""

    home: Path | None
    python: Path | None
    ckpt: Path | None

    @classmethod
    def discover(
        cls,
        home: Path | str | None = None,
        python: Path | str | None = None,
        ckpt: Path | str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> MohoInstall:
        """Arguments first, then ``MOHO_HOME`` / ``MOHO_PYTHON`` / ``MOHO_CKPT`` from ``environ``."""
        env = os.environ if environ is None else environ
        values = [
            value if value not in (None, "") else env.get(var) or None
            for value, var in zip((home, python, ckpt), ENV_VARS, strict=True)
        ]
        return cls(*(Path(v).expanduser() if v else None for v in values))

    def missing(self) -> list[str]:
        """The environment variables of the parts not configured."""
        return [
            var for var, value in zip(ENV_VARS, (self.home, self.python, self.ckpt), strict=True) if not value
        ]


@dataclass(frozen=True)
class Availability:
    """Whether MOHO can run here, and why (not)."""

    ok: bool
    reason: str


def probe(install: MohoInstall, device: str = "cuda", timeout_s: float = 120.0) -> Availability:
    """Check the install and import MOHO's dependencies in its interpreter, within ``timeout_s``.

    Args:
        install: The discovered install.
        device: ``cuda`` (then torch there must see a GPU) or ``cpu``.
        timeout_s: Limit for the import check; a first import of torch on a cold disk is slow.
    Returns:
        Availability; ``reason`` names the missing variable, file or module when not ok.
    """
    if missing := install.missing():
        return Availability(False, f"{', '.join(missing)} not set")
    assert install.home and install.python and install.ckpt  # for the type checker: missing() is empty
    for path, what in (
        (install.home / RUNNER, f"MOHO_HOME has no {RUNNER} (OCC-MLLM's runner)"),
        (install.home / BASE_CONF, f"MOHO_HOME has no {BASE_CONF}"),
        (install.home / MANO_MODEL, f"MOHO_HOME has no {MANO_MODEL} (MANO is licence-gated; install it)"),
        (install.ckpt, "MOHO_CKPT is not a file"),
    ):
        if not path.is_file():
            return Availability(False, f"{what}: {path}")
    if not (install.python.is_file() and os.access(install.python, os.X_OK)):
        return Availability(False, f"MOHO_PYTHON is not an executable file: {install.python}")
    try:
        done = subprocess.run(
            [str(install.python), "-c", PROBE_CODE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=moho_env(install, gpu=None),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return Availability(False, f"importing MOHO's dependencies timed out after {timeout_s:g}s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Availability(False, f"MOHO_PYTHON cannot import MOHO's dependencies: {last}")
    if device.startswith("cuda") and done.stdout.strip().splitlines()[-1:] != ["True"]:
        return Availability(
            False, "torch in MOHO_PYTHON sees no CUDA device (use device='cpu' to run anyway)"
        )
    return Availability(True, f"MOHO at {install.home} with {install.python}")


def moho_env(install: MohoInstall, gpu: str | None, torch_home: Path | None = None) -> dict[str, str]:
    """Environment of a MOHO subprocess: occ's own Python paths removed, MOHO_HOME importable, the GPU set."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(install.home)
    env["PYTHONUNBUFFERED"] = "1"  # so a killed run's log ends where it stopped
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if torch_home is not None:
        # resnet34(True) downloads ImageNet weights unless they are already under TORCH_HOME.
        env["TORCH_HOME"] = str(torch_home)
    return env


# --- staging --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staging:
    """The scratch directory of one MOHO run and the names MOHO reads and writes in it."""

    workdir: Path
    split: str
    sample_ids: tuple[str, ...]

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data" / "obman" / self.split

    @property
    def exp_dir(self) -> Path:
        return self.workdir / "exp"

    @property
    def cache_path(self) -> Path:
        return self.workdir / "cache" / f"obman_{self.split}.pkl"

    @property
    def list_file(self) -> Path:
        return self.workdir / LIST_FILE

    @property
    def conf_path(self) -> Path:
        return self.workdir / "moho.conf"

    def log_path(self, step: str) -> Path:
        return self.workdir / "logs" / f"{step}.log"

    def rgb_link(self, sample_id: str) -> Path:
        return self.data_dir / "rgb" / f"{sample_id}.jpg"

    def view_path(self, sample_id: str) -> Path:
        """MOHO's name for the view-0 render: ``{scene}_{ref}_{last four parts of the image path}.png``."""
        name = "_".join([sample_id, "0", *self.rgb_link(sample_id).parts[-4:]]) + ".png"
        return self.exp_dir / VIEW_DIR / name

    def mesh_candidates(self, sample_id: str) -> list[Path]:
        return [self.exp_dir / folder / f"{sample_id}.ply" for folder in MESH_DIRS]


def conf_overrides(staging: Staging) -> dict[str, Any]:
    """The single-view ObMan settings laid over the upstream conf (docs/obman-moho.md C2 step 4).

    ``inner_iter`` and ``train_inner_iter`` must be 1: each scene has one image, and MOHO drops scenes
    with fewer images than ``inner_iter``.
    """
    return {
        "general.base_exp_dir": str(staging.exp_dir),
        "dataset.name": "multi_object_obman",
        "dataset.data_dir": str(staging.data_dir),
        "dataset.ref_dir": str(staging.data_dir),
        "dataset.cache_dir": str(staging.cache_path),
        "dataset.inner_iter": 1,
        "dataset.cat": 0,
        "dataset.ref_mask": True,
        "train.train_inner_iter": 1,
    }


def _hocon_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a HOCON quoted string


def generate_conf(base_text: str, overrides: Mapping[str, Any]) -> str:
    """The upstream conf with ``overrides`` appended as dotted keys; in HOCON the later value wins."""
    lines = [f"{key} = {_hocon_value(value)}" for key, value in overrides.items()]
    return (
        base_text.rstrip("\n")
        + "\n\n# occ moho_bridge: single-view ObMan overrides\n"
        + "\n".join(lines)
        + "\n"
    )


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(target).resolve())


def _file_identity(path: Path) -> list:
    """Path, size and mtime: enough to tell another file from the one a run used."""
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def stage_inputs(samples: Sequence[SampleRef], workdir: Path, install: MohoInstall) -> Staging:
    """Lay out one run's inputs in ``workdir`` (docs/obman-moho.md C2 steps 1, 3-6).

    The input links are rebuilt on every call (MOHO reconstructs every scene it finds in the data
    folder); ``exp/`` is kept, so a re-run resumes (MOHO skips views it already wrote). The hand cache
    (step 2) is built by the ``prep`` step of run_step, inside MOHO's environment.

    Args:
        samples: Samples of one split, inputs already checked.
        workdir: Scratch directory; must not be inside MOHO_HOME.
        install: A probed install.
    Returns:
        The Staging of this run.
    Raises:
        StageError: ``workdir`` is inside MOHO_HOME, or the samples mix splits.
    """
    assert install.home and install.ckpt, f"install not probed: {install}"
    workdir = Path(workdir).resolve()
    if workdir.is_relative_to(install.home.resolve()):
        raise StageError(f"MOHO staging dir {workdir} must not be inside MOHO_HOME {install.home}")
    splits = {s.split for s in samples}
    if len(splits) != 1:
        raise StageError(f"one MOHO run takes one split, got {sorted(splits)}")
    staging = Staging(workdir, splits.pop(), tuple(s.sample_id for s in samples))
    shutil.rmtree(staging.data_dir, ignore_errors=True)
    # exp/ resumes only the same run: another checkpoint or other inputs must not find MOHO's old views.
    identity = json.dumps(
        {"ckpt": _file_identity(install.ckpt), "inputs": [_file_identity(s.rgb_path) for s in samples]}
    )
    stamp = staging.exp_dir / ".occ-identity"
    if not stamp.is_file() or stamp.read_text() != identity:
        shutil.rmtree(staging.exp_dir, ignore_errors=True)
        write_text_atomic(stamp, identity)
    for sample in samples:
        _link(staging.rgb_link(sample.sample_id), sample.rgb_path)
        _link(staging.data_dir / "segm" / f"{sample.sample_id}.png", sample.segm_path)
        # Unrestricted pickle.load reads these inside MOHO: only metas load_meta accepted get here.
        _link(staging.data_dir / "meta" / f"{sample.sample_id}.pkl", sample.meta_path)
    rows = [f"{sid}\t0\t0\t{staging.rgb_link(sid)}" for sid in staging.sample_ids]
    write_text_atomic(staging.list_file, "\n".join(rows) + "\n")
    base = (install.home / BASE_CONF).read_text()
    write_text_atomic(staging.conf_path, generate_conf(base, conf_overrides(staging)))
    _link(staging.exp_dir / CHECKPOINT_NAME, install.ckpt)
    _link(workdir / "externals", install.home / "externals")
    return staging


# --- running --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MohoRun:
    """One MOHO subprocess: how it ended, never an exception (nanochat execution.py pattern)."""

    step: str
    returncode: int | None  # None when killed on timeout
    timed_out: bool
    log_path: Path
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """``timed out after ...`` or ``exited with ...``, with the log to read."""
        how = f"timed out after {self.seconds:.0f}s" if self.timed_out else f"exited with {self.returncode}"
        return f"MOHO {self.step} {how} (log: {self.log_path})"


def run_logged(
    command: Sequence[str], cwd: Path, env: Mapping[str, str], timeout_s: float, log_path: Path, step: str
) -> MohoRun:
    """Run ``command`` in its own process group, stdout and stderr to ``log_path``, within ``timeout_s``.

    On timeout (or an interrupt here) the whole group is killed, so workers the command started die too.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log, Timer() as timer:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if returncode is None:
            log.write(f"\n[moho_bridge] killed after {timeout_s:g}s\n".encode())
    return MohoRun(step, returncode, returncode is None, log_path, timer.seconds)


def step_command(step: str, staging: Staging, install: MohoInstall, gpu: str, device: str) -> list[str]:
    """The command line of one step: ``prep`` (hand cache) or a runner mode."""
    launcher = [str(install.python), str(IN_MOHO_ENV)]
    if step == "prep":
        return [*launcher, "prep", "--data-dir", str(staging.data_dir), "--out", str(staging.cache_path)]
    gpu_num = len(gpu.split(",")) if device.startswith("cuda") else 1
    return [
        *launcher,
        "run",
        str(install.home / RUNNER),
        "--conf",
        str(staging.conf_path),
        "--case",
        CASE,
        "--mode",
        step,
        "--gpu_num",
        str(gpu_num),
        "--device",
        device,
    ]


def run_step(
    step: str,
    staging: Staging,
    install: MohoInstall,
    gpu: str = "0",
    device: str = "cuda",
    timeout_s: float = 3600.0,
    torch_home: Path | None = None,
) -> MohoRun:
    """Run one step in the staging dir with MOHO's environment; see step_command."""
    return run_logged(
        step_command(step, staging, install, gpu, device),
        cwd=staging.workdir,
        env=moho_env(install, gpu, torch_home),
        timeout_s=timeout_s,
        log_path=staging.log_path(step),
        step=step,
    )


# --- collection -----------------------------------------------------------------------------------


def check_view(path: Path) -> Path:
    """A MOHO view must decode to IMAGE_SIZE x IMAGE_SIZE x 3 and not be blank (one flat colour).

    Raises:
        BadSample: Missing, unreadable, wrong shape or blank.
    """
    if not path.is_file():
        raise BadSample(path, "MOHO wrote no view for this sample")
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadSample(path, f"MOHO view is unreadable: {exc}") from exc
    expected = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if pixels.shape != expected:
        raise BadSample(path, f"MOHO view has shape {pixels.shape}, expected {expected}")
    if pixels.min() == pixels.max():
        raise BadSample(path, "MOHO view is blank")
    return path


def collect_sample(staging: Staging, sample_id: str) -> tuple[Path, Path]:
    """The checked view and mesh MOHO wrote for one sample.

    Raises:
        BadSample: The view fails check_view, or no mesh folder has a mesh with faces.
    """
    view = check_view(staging.view_path(sample_id))
    candidates = staging.mesh_candidates(sample_id)
    mesh = next((p for p in candidates if p.is_file()), None)
    if mesh is None:
        raise BadSample(candidates[0], "MOHO wrote no mesh for this sample")
    load_mesh(mesh)
    return view, mesh


def _copy_atomic(source: Path, target: Path) -> Path:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def git_commit(repo: Path) -> str:
    """HEAD of a git checkout, or ``unknown (...)`` when it is none."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


def conf_hash(staging: Staging) -> str:
    """sha256 of the generated conf with the scratch path masked, so equal settings hash equal."""
    return sha256_bytes(staging.conf_path.read_text().replace(str(staging.workdir), "<staging>").encode())


# --- the backend ----------------------------------------------------------------------------------


class MohoReconstructor:
    """The ``moho`` backend (see the module docstring)."""

    name = "moho"

    def __init__(
        self,
        home: Path | str | None = None,
        python: Path | str | None = None,
        ckpt: Path | str | None = None,
        gpu: str = "0",
        device: str = "cuda",
        timeout_s: float = 3600.0,
        probe_timeout_s: float = 120.0,
        workdir: Path | None = None,
        torch_home: Path | None = None,
    ) -> None:
        """Args:
        home, python, ckpt: MOHO_HOME, MOHO_PYTHON, MOHO_CKPT; None reads the environment variable.
        gpu: CUDA_VISIBLE_DEVICES for the run (e.g. ``"0"`` or ``"0,1"``; gpu_num follows).
        device: ``cuda`` or ``cpu`` (passed as ``--device``).
        timeout_s: Wall-clock limit of each step (prep, test_image, test_mesh_single).
        probe_timeout_s: Limit of the dependency import check.
        workdir: Staging directory; None means ``{out_dir}/moho_work``.
        torch_home: TORCH_HOME holding the ImageNet resnet34 weights (MOHO downloads them otherwise).
        """
        self.install = MohoInstall.discover(home, python, ckpt)
        self.gpu, self.device = gpu, device
        self.timeout_s, self.probe_timeout_s = timeout_s, probe_timeout_s
        self.workdir, self.torch_home = workdir, torch_home
        self.runs: list[MohoRun] = []
        self._provenance: dict[str, Any] = {}

    def probe(self) -> Availability:
        return probe(self.install, self.device, self.probe_timeout_s)

    def provenance(self) -> dict[str, Any]:
        """MOHO commit, checkpoint and conf hashes; the conf hash is known once a run was staged."""
        if not self._provenance and self.install.home and self.install.ckpt:
            self._provenance = {
                "backend": "moho",
                "label": "MOHO (CVPR 2024) through OCC-MLLM's recontruct_3Dimage.py",
                "moho_home": str(self.install.home),
                "moho_commit": git_commit(self.install.home),
                "ckpt": str(self.install.ckpt),
                "ckpt_sha256": sha256_file(self.install.ckpt),
                "inputs": INPUT_NOTE,
            }
        return dict(self._provenance)

    def reconstruct(self, samples: Sequence[SampleRef], out_dir: Path) -> list[ReconResult]:
        """Check inputs, then stage, run and collect in batches of at most MAX_SCENES_PER_RUN.

        Raises:
            StageError: MOHO is not available here (the probe's reason is in the message).
        """
        availability = self.probe()
        if not availability.ok:
            raise StageError(f"moho backend is not available: {availability.reason}")
        self.provenance()
        results: dict[str, ReconResult] = {}
        poses: dict[str, np.ndarray] = {}
        for sample in samples:
            try:
                poses[sample.sample_id] = self._check_inputs(sample)
            except BadSample as exc:
                results[sample.sample_id] = ReconResult.failure(sample.sample_id, exc.path, exc.reason)
        ready = [s for s in samples if s.sample_id in poses]
        workdir = Path(self.workdir) if self.workdir is not None else Path(out_dir) / "moho_work"
        for start in range(0, len(ready), MAX_SCENES_PER_RUN):
            batch = ready[start : start + MAX_SCENES_PER_RUN]
            results.update(self._run_batch(batch, poses, workdir, Path(out_dir)))
        return [results[s.sample_id] for s in samples]

    @staticmethod
    def _check_inputs(sample: SampleRef) -> np.ndarray:
        meta = load_meta(sample.meta_path)
        read_rgb(sample.rgb_path)
        read_segm(sample.segm_path)
        return object_to_camera(meta)

    def _run_batch(
        self, batch: list[SampleRef], poses: dict[str, np.ndarray], workdir: Path, out_dir: Path
    ) -> dict[str, ReconResult]:
        staging = stage_inputs(batch, workdir, self.install)
        self._provenance["conf_sha256"] = conf_hash(staging)
        for step in STEPS:
            run = run_step(
                step, staging, self.install, self.gpu, self.device, self.timeout_s, self.torch_home
            )
            self.runs.append(run)
            if not run.ok:
                return {
                    s.sample_id: ReconResult.failure(s.sample_id, run.log_path, run.describe()) for s in batch
                }
        results = {}
        for sample in batch:
            sid = sample.sample_id
            try:
                view, mesh = collect_sample(staging, sid)
            except BadSample as exc:
                results[sid] = ReconResult.failure(sid, exc.path, exc.reason)
                continue
            mesh_path = _copy_atomic(mesh, out_dir / f"{sid}.ply")
            view0 = _copy_atomic(view, out_dir / "moho_views" / view.name)
            results[sid] = ReconResult(sid, True, mesh_path, pose_floats(poses[sid]), view0_path=view0)
        return results
