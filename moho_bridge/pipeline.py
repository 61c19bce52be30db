"""Reconstruct and render a split: the library calls behind ``occ reconstruct``, ``occ render`` and the
render flow (flows/render.py), which only add Prefect around them.

    occ reconstruct --root ROOT --split test --backend depth --out OUT
    occ render --root ROOT --split test --backend depth --views 8 --out VIEWS

Reconstruct writes ``{OUT}/{id}.ply`` (object frame) and ``{OUT}/manifest.parquet`` (one row per sample:
id, status, error, backend, obj_to_cam as 16 floats, mesh sha256, provenance). Render reconstructs the
samples whose views are missing into ``{VIEWS}/meshes/`` (one manifest per shard) and writes view 0 and
the orbit views into ``{VIEWS}`` under MOHO's names; with the ``moho`` backend, view 0 is MOHO's own
render and only the orbit views come from its mesh.

Without ``--out`` both write under ``stage_dir(stage, key)``; the key hashes the content of every input
file (rgb, segm, depth, meta), the backend and its output-relevant options, the render settings and the
code version. Same inputs, same directory, nothing to do; any change, a sibling directory (for render,
a changed sample anywhere in the split moves the whole run there, and its shards render again). Oracle
meshes (ShapeNet files) are not hashed: they are treated as fixed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from moho_bridge import depth, in_moho_env, moho, oracle, protocol
from moho_bridge.moho import git_commit
from moho_bridge.protocol import ReconResult, get_reconstructor
from occ_core import obman
from occ_core import render as render_lib
from occ_core.config import get_settings
from occ_core.errors import StageError
from occ_core.fsio import (
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)
from occ_core.obman import SampleRef, list_samples
from occ_core.render import RenderConfig, RenderJob, complete_rows, contact_sheet, render_jobs, view_filename
from occ_core.splits import SplitName
from occ_core.stage import StageReport, Timer, code_version, params_hash, stage_dir, stage_key

Backend = Literal["depth", "oracle", "moho"]
INPUT_KINDS = ("rgb", "segm", "depth", "meta")
CONTACT_SHEET = "contact_sheet.png"
SHEET_SAMPLES = 6


def pipeline_code_version() -> str:
    """Version of every module whose change alters meshes or views."""
    import moho_bridge.pipeline as this

    return code_version(protocol, depth, oracle, moho, in_moho_env, this, obman, render_lib)


class MohoOptions(BaseModel):
    """How to reach and run the real MOHO (``moho`` backend only)."""

    model_config = ConfigDict(frozen=True)

    home: Path | None = Field(None, description="MOHO checkout (None: the MOHO_HOME environment variable)")
    python: Path | None = Field(None, description="MOHO's interpreter (None: MOHO_PYTHON)")
    ckpt: Path | None = Field(None, description="MOHO checkpoint (None: MOHO_CKPT)")
    gpu: str = Field("0", description="CUDA_VISIBLE_DEVICES for MOHO runs, e.g. '0' or '0,1'")
    device: Literal["cuda", "cpu"] = Field("cuda", description="torch device MOHO runs on")
    timeout_s: float = Field(3600.0, gt=0, description="wall-clock limit of each MOHO step, in seconds")
    torch_home: Path | None = Field(
        None, description="TORCH_HOME with MOHO's ImageNet resnet34 weights (None: inherit the environment)"
    )


def moho_identity(install: moho.MohoInstall) -> dict[str, Any]:
    """What makes MOHO's outputs what they are: its commit and its checkpoint (path, size, mtime).

    The environment variables are resolved here, so a new MOHO_CKPT gives a new key. Size and mtime
    stand for the checkpoint's content: hashing gigabytes on every plan would cost more than the check.
    """
    ckpt = install.ckpt
    stat = ckpt.stat() if ckpt is not None and ckpt.is_file() else None
    return {
        "home": str(install.home) if install.home else None,
        "commit": git_commit(install.home) if install.home is not None and install.home.is_dir() else None,
        "ckpt": str(ckpt.resolve()) if ckpt is not None else None,
        "ckpt_stat": [stat.st_size, stat.st_mtime_ns] if stat else None,
    }


class ReconstructParams(BaseModel):
    """What to reconstruct and with which backend."""

    model_config = ConfigDict(frozen=True)

    root: Path = Field(description="dataset root holding the split folders (ObMan layout)")
    split: SplitName = Field("test", description="split folder to process, a name: train, val, test, ...")
    backend: Backend = Field(
        "depth",
        description="reconstruction backend: depth (built-in geometric fallback), oracle (ground-truth "
        "mesh, an upper bound) or moho (the real MOHO, see MohoOptions)",
    )
    limit: int | None = Field(None, ge=1, description="only the first N samples by id (None: all)")
    depth_convention: Literal["writer", "reader"] | None = Field(
        None, description="depth PNG direction for the depth backend (None: OCC_DEPTH_CONVENTION)"
    )
    shapenet_root: Path | None = Field(
        None, description="ShapeNet root for the oracle backend (None: ROOT/shapenet)"
    )
    moho: MohoOptions = Field(default_factory=MohoOptions, description="moho backend settings")

    def backend_options(self) -> dict[str, Any]:
        """Constructor arguments of the chosen backend."""
        if self.backend == "depth":
            return {"depth_convention": self.depth_convention or get_settings().depth_convention}
        if self.backend == "oracle":
            return {"shapenet_root": self.shapenet_root}
        return self.moho.model_dump()

    def output_params(self) -> dict[str, Any]:
        """The settings that change the meshes: the part of the stage key these params contribute."""
        options = self.backend_options()
        if self.backend == "moho":
            options = moho_identity(
                moho.MohoInstall.discover(self.moho.home, self.moho.python, self.moho.ckpt)
            )
        return {"backend": self.backend, **options}


class RenderParams(ReconstructParams):
    """Reconstruct, then render hand-free views of each object. The render flow's parameters."""

    views: int = Field(8, ge=0, description="orbit views besides view 0 (the input camera)")
    elevations_deg: tuple[float, ...] = RenderConfig.model_fields["elevations_deg"]
    size: int = Field(render_lib.OBMAN_SIZE, ge=16, description="square image side in pixels")
    shard_size: int = Field(200, ge=1, description="samples per shard (one Prefect task each)")
    renderer: str = Field("pyrender", description="render backend (occ_core.render.BACKENDS)")
    processes: int | None = Field(
        None, ge=1, description="renderer processes per shard (None: OCC_PROCESSES)"
    )
    out: Path | None = Field(None, description="views directory (None: the stage directory of the key)")

    def render_config(self) -> RenderConfig:
        chosen = {"processes": self.processes} if self.processes is not None else {}
        return RenderConfig(
            size=self.size,
            views=self.views,
            elevations_deg=self.elevations_deg,
            backend=self.renderer,
            **chosen,
        )


def select_samples(root: Path, split: str, limit: int | None = None) -> list[SampleRef]:
    """The split's samples by id, the first ``limit`` of them when given.

    Raises:
        StageError: The split has no sample file (obman.list_samples: any of rgb, segm, depth, meta).
    """
    samples = list_samples(Path(root), split)
    if not samples:
        raise StageError(f"{Path(root) / split}: no samples (expected ObMan rgb, segm, depth and meta files)")
    return samples[:limit]


def input_digests(samples: Sequence[SampleRef]) -> list[str]:
    """One ``id/kind:sha256`` per input file; a missing file hashes as ``missing`` (quarantined later)."""
    digests = []
    for sample in samples:
        for kind in INPUT_KINDS:
            path: Path = getattr(sample, f"{kind}_path")
            digest = sha256_file(path) if path.is_file() else "missing"
            digests.append(f"{sample.sample_id}/{kind}:{digest}")
    return digests


def reconstruct_key(digests: Sequence[str], params: ReconstructParams) -> str:
    """Stage key of meshes: input content, backend settings, code version."""
    return stage_key(digests, params.output_params(), pipeline_code_version())


def render_key(digests: Sequence[str], params: RenderParams) -> str:
    """Stage key of views: reconstruct_key's parts plus the render settings."""
    settings = {"reconstruct": params.output_params(), "render": params.render_config().cache_params()}
    return stage_key(digests, settings, pipeline_code_version())


MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_path", pa.string()),
        ("backend", pa.string()),
        ("obj_to_cam", pa.list_(pa.float64(), 16)),
        ("mesh_path", pa.string()),
        ("mesh_sha256", pa.string()),
        ("view0_path", pa.string()),
        ("params_hash", pa.string()),
        ("code_version", pa.string()),
        ("provenance", pa.string()),
    ]
)


def write_manifest(
    results: Sequence[ReconResult], params: ReconstructParams, provenance: dict[str, Any], path: Path
) -> Path:
    """One Parquet row per sample (MANIFEST_SCHEMA): status and error, pose, mesh and its sha256,
    the backend with its settings hash, the code version and the backend's provenance (JSON)."""
    common = {
        "backend": params.backend,
        "params_hash": params_hash(params.output_params()),
        "code_version": pipeline_code_version(),
        "provenance": json.dumps(provenance, sort_keys=True),
    }
    rows = [
        {
            "id": r.sample_id,
            "status": "ok" if r.ok else "failed",
            "error": r.error,
            "error_path": r.error_path,
            "obj_to_cam": list(r.obj_to_cam) if r.obj_to_cam is not None else None,
            "mesh_path": str(r.mesh_path) if r.mesh_path else None,
            "mesh_sha256": sha256_file(r.mesh_path) if r.ok and r.mesh_path else None,
            "view0_path": str(r.view0_path) if r.view0_path else None,
            **common,
        }
        for r in results
    ]
    return write_parquet_atomic(path, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))


def reconstruct(
    samples: Sequence[SampleRef],
    params: ReconstructParams,
    out_dir: Path,
    manifest_name: str = "manifest.parquet",
    **backend_overrides: Any,
) -> tuple[StageReport, list[ReconResult]]:
    """Reconstruct ``samples`` into ``out_dir`` and write the manifest; bad samples are quarantined.

    Args:
        samples: Samples of one split.
        params: Backend and its settings.
        out_dir: Where ``{id}.ply`` and the manifest go (created if missing).
        manifest_name: File name of the manifest in ``out_dir``.
        backend_overrides: Extra constructor arguments for the backend (e.g. a MOHO ``workdir``).
    Returns:
        The report (ok / failed with the quarantined files) and one result per sample.
    Raises:
        StageError: The backend cannot run at all (e.g. MOHO not available).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reconstructor = get_reconstructor(params.backend, **(params.backend_options() | backend_overrides))
    report = StageReport("reconstruct")
    with Timer() as timer:
        # The datasets stage admits samples by the same rule, so no stage uses a file another refuses.
        admitted, refused = obman.admit_samples(list(samples), INPUT_KINDS)
        results = [ReconResult.failure(bad.sample_id, bad.path, bad.reason) for bad in refused]
        results += reconstructor.reconstruct(admitted, out_dir) if admitted else []
        write_manifest(results, params, reconstructor.provenance(), out_dir / manifest_name)
    for result in results:
        if result.ok:
            report.ok += 1
        else:
            report.quarantine(result.sample_id, result.error_path or "", result.error or "unknown error")
    report.seconds = timer.seconds
    return report, results


def view_paths(sample: SampleRef, cfg: RenderConfig, views_dir: Path) -> list[Path]:
    """View 0 and the orbit views of one sample, under MOHO's names."""
    return [views_dir / view_filename(sample.sample_id, sample.split, v) for v in range(1 + cfg.views)]


def adopt_backend_views(results: Sequence[ReconResult], split: str, views_dir: Path) -> int:
    """Put the backend's own view-0 renders (MOHO's) in place of view 0 rendered from its mesh.

    Returns:
        How many view-0 files were replaced.
    """
    replaced = 0
    for result in results:
        if result.ok and result.view0_path is not None:
            target = views_dir / view_filename(result.sample_id, split, 0)
            if not target.is_file() or target.read_bytes() != result.view0_path.read_bytes():
                write_bytes_atomic(target, result.view0_path.read_bytes())
                replaced += 1
    return replaced


@dataclass(frozen=True)
class RenderShard:
    """One shard of a render run: its samples and its stage key (the Prefect cache key)."""

    index: int
    samples: tuple[SampleRef, ...]
    key: str

    def marker(self, views_dir: Path) -> Path:
        """The file that says this shard finished in ``views_dir`` (its report summary, as JSON)."""
        return Path(views_dir) / "shards" / f"{self.index:05d}-{self.key}.json"

    def started_marker(self, views_dir: Path) -> Path:
        """The file that says an attempt of this very shard (same key) began writing into ``views_dir``."""
        return Path(views_dir) / "shards" / f"{self.index:05d}-{self.key}.started"


def render_shard(shard: RenderShard, params: RenderParams, views_dir: Path) -> StageReport:
    """Reconstruct what is missing and render every view of one shard into ``views_dir``.

    A sample whose views all exist is skipped without reconstructing it; a bad sample is quarantined
    (at reconstruction or at rendering) and the shard goes on. At the end the shard's marker is written.

    Args:
        shard: The shard's samples (one split), index and key.
        params: Backend, render settings.
        views_dir: Output directory of the views; meshes go to ``views_dir/meshes``, with one manifest
            per shard, ``manifest-{index}.parquet``.
    Returns:
        StageReport: ok (rendered), skipped (already complete), failed with the quarantined files;
        extra ``views`` (files written), ``views_per_s``, ``reconstructed``.
    Raises:
        StageError: The backend or the renderer cannot run at all.
    """
    cfg = params.render_config()
    views_dir = Path(views_dir)
    started = shard.started_marker(views_dir)
    # Views already in views_dir are this shard's only if an interrupted attempt with the same key wrote
    # them: a directory given with --out may hold views of other inputs, backends or settings.
    resuming = started.is_file()
    if resuming:
        todo = [s for s in shard.samples if not all(p.is_file() for p in view_paths(s, cfg, views_dir))]
    else:
        todo = list(shard.samples)
        write_text_atomic(started, shard.key)
    report = StageReport("render", skipped=len(shard.samples) - len(todo), extra={"views": 0})
    with Timer() as timer:
        if todo:
            report = StageReport.merge(
                "render", [report, _reconstruct_and_render(todo, params, views_dir, shard.index)]
            )
    report.seconds = timer.seconds
    write_json_atomic(shard.marker(views_dir), report.summary())
    started.unlink(missing_ok=True)
    return report


def _reconstruct_and_render(
    samples: Sequence[SampleRef], params: RenderParams, views_dir: Path, shard_index: int
) -> StageReport:
    mesh_dir = views_dir / "meshes"
    overrides = {"workdir": mesh_dir / f"moho_work-{shard_index:05d}"} if params.backend == "moho" else {}
    recon, results = reconstruct(
        samples, params, mesh_dir, f"manifest-{shard_index:05d}.parquet", **overrides
    )
    photos = {s.sample_id: s.rgb_path for s in samples}
    jobs = [
        RenderJob(r.sample_id, params.split, r.mesh_path, r.pose(), image_path=photos[r.sample_id])
        for r in results
        if r.ok and r.mesh_path is not None
    ]
    rendered = render_jobs(jobs, params.render_config(), views_dir, overwrite=True)
    adopt_backend_views(results, params.split, views_dir)
    rendered.quarantined[:0] = recon.quarantined
    rendered.failed += recon.failed
    rendered.extra["reconstructed"] = recon.ok
    return rendered


def shard_done(shard: RenderShard, views_dir: Path) -> bool:
    """Whether ``shard`` finished in ``views_dir`` (its marker is there)."""
    return shard.marker(views_dir).is_file()


@dataclass(frozen=True)
class RenderPlan:
    """A render run: where the views go and the shards that fill it."""

    views_dir: Path
    key: str
    shards: tuple[RenderShard, ...]
    done: frozenset[int] = frozenset()  # indices of shards whose marker was in views_dir when planned


def plan_render(params: RenderParams) -> RenderPlan:
    """Shard the split and key every shard and the whole run by input content and settings.

    Raises:
        StageError: The split has no samples.
    """
    samples = select_samples(params.root, params.split, params.limit)
    shards = []
    all_digests: list[str] = []
    for index, start in enumerate(range(0, len(samples), params.shard_size)):
        chunk = tuple(samples[start : start + params.shard_size])
        digests = input_digests(chunk)
        all_digests += digests
        shards.append(RenderShard(index, chunk, render_key(digests, params)))
    key = render_key(all_digests, params)
    views_dir = (Path(params.out) if params.out is not None else stage_dir("render", key)).resolve()
    done = frozenset(shard.index for shard in shards if shard_done(shard, views_dir))
    return RenderPlan(views_dir, key, tuple(shards), done)


def as_seen_by_this_run(reports: Sequence[StageReport], plan: RenderPlan) -> list[StageReport]:
    """Shard reports in plan order, with every shard that was done when planned counted as skipped.

    Such a shard's report comes from the cache (an earlier run's counts): its rendered samples are
    skipped in this run, its views and seconds are not this run's; its failures stay failures.
    """
    seen = []
    for shard, report in zip(plan.shards, reports, strict=True):
        if shard.index in plan.done:
            report = StageReport(
                "render",
                skipped=report.ok + report.skipped,
                failed=report.failed,
                quarantined=list(report.quarantined),
                extra={"views": 0},
            )
        seen.append(report)
    return seen


def shard_rows(reports: Sequence[StageReport]) -> list[dict[str, Any]]:
    """Table rows, one per shard and a total: rendered, skipped, failed, views, seconds, views/s."""

    def row(name: str, report: StageReport) -> dict[str, Any]:
        views = int(report.extra.get("views", 0))
        return {
            "shard": name,
            "rendered": report.ok,
            "skipped": report.skipped,
            "failed": report.failed,
            "views": views,
            "seconds": round(report.seconds, 2),
            "views/s": round(views / report.seconds, 1) if report.seconds > 0 else 0.0,
        }

    total = StageReport.merge("render", reports)
    total.seconds = sum(r.seconds for r in reports)
    return [row(f"{i:05d}", r) for i, r in enumerate(reports)] + [row("total", total)]


def write_contact_sheet(plan: RenderPlan, cfg: RenderConfig, limit: int = SHEET_SAMPLES) -> Path | None:
    """A contact sheet of the first ``limit`` fully rendered samples: photo, then every view."""
    candidates = (
        (sample.rgb_path, view_paths(sample, cfg, plan.views_dir))
        for shard in plan.shards
        for sample in shard.samples
    )
    rows = complete_rows(candidates, limit)
    return contact_sheet(rows, plan.views_dir / CONTACT_SHEET) if rows else None


def summarize_render(
    reports: Sequence[StageReport], plan: RenderPlan, params: RenderParams
) -> dict[str, Any]:
    """Merge shard reports, write ``quarantine.jsonl`` and the contact sheet, return the run summary.

    Returns:
        backend, split, views_dir, contact_sheet (or None), counts of this run (rendered, skipped,
        failed), the quarantined samples, views and views/s, and ``shards``: the per-shard table.
    """
    reports = as_seen_by_this_run(reports, plan)
    rows = shard_rows(reports)
    total = StageReport.merge("render", reports)
    total.write_quarantine(plan.views_dir)
    sheet = write_contact_sheet(plan, params.render_config())
    return {
        "backend": params.backend,
        "split": params.split,
        "views_dir": str(plan.views_dir),
        "contact_sheet": str(sheet) if sheet else None,
        "rendered": total.ok,
        "skipped": total.skipped,
        "failed": total.failed,
        "quarantined": [f"{q.sample_id}: {q.path}: {q.reason}" for q in total.quarantined],
        "views": rows[-1]["views"],
        "views_per_s": rows[-1]["views/s"],
        "shards": rows,
    }


def render_split(params: RenderParams) -> dict[str, Any]:
    """Plan, render every shard in turn, summarise: ``occ render`` without Prefect."""
    plan = plan_render(params)
    reports = [render_shard(shard, params, plan.views_dir) for shard in plan.shards]
    return summarize_render(reports, plan, params)


def reconstruct_split(params: ReconstructParams, out: Path | None = None) -> tuple[Path, StageReport]:
    """Reconstruct a split into ``out`` (default: the stage directory of its key): ``occ reconstruct``."""
    samples = select_samples(params.root, params.split, params.limit)
    out_dir = (
        Path(out)
        if out is not None
        else stage_dir("reconstruct", reconstruct_key(input_digests(samples), params))
    )
    report, _ = reconstruct(samples, params, out_dir)
    report.write_quarantine(out_dir)
    return out_dir, report
