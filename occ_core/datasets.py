"""The datasets stage: one ObMan split, graded for clarity, turned into the data of every training stage.

Command::

    python -m occ_core.datasets --root ROOT --split train [--grader visibility] [--predictions P.json]
        [--renders VIEWS_DIR] [--cot-fraction 0.25] [--balance/--no-balance] [--stratify] [--seed 0]
        [--allow-degenerate]

Everything lands in ``stage_dir("datasets", key)``, the key hashing the split's absolute path and its
files (ids, sizes and modification times of meta, segm and rgb), the predictions file, the renders
(path and files), the parameters and this code: every path the outputs name is in it. Each dataset
is a JSONL in the method's format, the same rows as trl Parquet, and an InternVL meta.json (see
occ_core.cot):

- ``samples.parquet``: one row per usable image: id, image, cls, visibility, model_error, unclear;
- ``sft1``, ``sft2`` (all images), ``sft2_balanced`` (when balancing), ``cot`` and ``pairs`` (from
  the balanced set, as upstream built them), ``sc`` (Q1 rows) and ``view3d`` (Q1 on the view-0
  render, when a renders folder is given; images without a render are counted, not quarantined);
- ``quarantine.jsonl``: bad samples with file and reason. A sample is every id with a file in one of
  the split's folders; it is used only when its meta, segm and rgb are present and decode
  (obman.validate_sample);
- ``summary.json`` (statistics, written last: a stage directory with it is complete, and running
  again is a no-op).

A split whose images all get one clarity label is an error with the counts (it would give no pairs
and a clarity answer that never varies), unless ``allow_degenerate`` is set.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from occ_core import cot, jsonl, obman, occlusion, preference
from occ_core.config import Settings, field_help
from occ_core.cot import CotConfig, Prompts
from occ_core.errors import BadSample, StageError
from occ_core.fsio import sha256_file, write_json_atomic, write_parquet_atomic
from occ_core.occlusion import GraderConfig
from occ_core.preference import BalanceConfig
from occ_core.splits import SplitName
from occ_core.stage import StageReport, Timer, code_version, stage_dir, stage_key

STAGE = "datasets"
SUMMARY = "summary.json"


class DatasetsConfig(BaseModel):
    """Parameters of the datasets stage (the flow's form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True)

    root: Path = Field(description="ObMan dataset root holding {split}/rgb, segm and meta")
    split: SplitName = Field("train", description="split to turn into training data")
    grader: GraderConfig = Field(default_factory=GraderConfig, description="clarity grader and its threshold")
    predictions: Path | None = Field(
        None,
        description="earlier checkpoint's Q1 answers {id: answer} or its wrong-id list (model-errors grader)",
    )
    allow_partial_predictions: bool = Field(
        False, description="accept predictions that lack some ids; those images get no model-error label"
    )
    renders: Path | None = Field(
        None, description="folder of view-0 renders for the 3D-view rows; None skips them"
    )
    cot_fraction: float = Field(0.25, ge=0.0, le=1.0, description=field_help(CotConfig, "cot_fraction"))
    sc_limit: int | None = Field(
        None, ge=1, description="rows of the SC dataset (upstream: 101); None keeps all"
    )
    balance: bool = Field(True, description=field_help(BalanceConfig, "balance"))
    stratify: bool = Field(False, description=field_help(BalanceConfig, "stratify"))
    seed: int = Field(
        0, ge=0, description="seed of every random choice (CoT rows, balancing); part of the stage key"
    )
    allow_degenerate: bool = Field(False, description=field_help(CotConfig, "allow_degenerate"))
    min_per_label: int = Field(
        4,
        ge=1,
        description="model-errors grader: fewest images of the rarer clarity label accepted when balancing "
        "(a model that made almost no errors gives a set too small to learn from)",
    )
    prompts: Prompts = Field(
        default_factory=Prompts, description="question strings and their upstream variants"
    )
    shard_size: int = Field(1000, ge=1, description="samples read per task; does not change the outputs")

    def cot_config(self, limit: int | None = None) -> CotConfig:
        return CotConfig(cot_fraction=self.cot_fraction, seed=self.seed, limit=limit, prompts=self.prompts)

    def balance_config(self) -> BalanceConfig:
        return BalanceConfig(balance=self.balance, stratify=self.stratify, seed=self.seed)

    def stage_params(self) -> dict[str, Any]:
        """Parameters that decide the outputs: paths are replaced by their content in the stage key.

        ``allow_degenerate`` and ``min_per_label`` are left out: they decide only whether a degenerate
        output is written, never what an output holds.
        """
        return self.model_dump(
            mode="json",
            exclude={"root", "predictions", "renders", "shard_size", "allow_degenerate", "min_per_label"},
        )


@dataclass(frozen=True)
class DatasetsPlan:
    """Where a run writes and how its samples are cut into shards."""

    key: str
    scan_key: str  # the split's content and the reading code only: new parameters reuse the scans
    out_dir: Path
    shards: tuple[tuple[str, ...], ...]

    @property
    def done(self) -> bool:
        return (self.out_dir / SUMMARY).is_file()


@dataclass
class ScanResult:
    """What one shard's images say: id, image name, class and visible share, plus bad samples."""

    table: pd.DataFrame
    report: StageReport


def _stat_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            digest.update(f"{path.name}\0missing\n".encode())
    return digest.hexdigest()


def split_fingerprint(refs: list[obman.SampleRef]) -> str:
    """Content key of a split: each sample's meta, segm and rgb names, sizes and modification times."""
    return "split:" + _stat_digest([p for r in refs for p in (r.meta_path, r.segm_path, r.rgb_path)])


def renders_fingerprint(renders: Path, split: str, ids: list[str]) -> str:
    """Content key of the view-0 renders this split would use."""
    from occ_core.render import view_filename  # render imports trimesh; only the 3D-view rows need it

    return "renders:" + _stat_digest([renders / view_filename(i, split, 0) for i in ids])


def plan(cfg: DatasetsConfig, settings: Settings | None = None) -> DatasetsPlan:
    """List the split, key the run on its inputs and parameters, and cut the samples into shards.

    Raises:
        StageError: The split has no samples.
    """
    refs = obman.list_samples(cfg.root, cfg.split)
    if not refs:
        raise StageError(
            f"{Path(cfg.root) / cfg.split}: no samples (no file in {', '.join(obman.SAMPLE_FILES)})"
        )
    ids = [r.sample_id for r in refs]
    code = code_version(cot, preference, occlusion, jsonl, obman, sys.modules[__name__])
    # The outputs name the absolute root (meta.json, trl image paths, quarantine records): so does the key.
    inputs = [f"root:{Path(cfg.root).resolve()}", split_fingerprint(refs)]
    scan_key = stage_key(inputs, {"split": cfg.split}, code)
    if cfg.predictions is not None:
        inputs.append("predictions:" + sha256_file(cfg.predictions))
    if cfg.renders is not None:
        renders = Path(cfg.renders).resolve()
        inputs += [f"renders-path:{renders}", renders_fingerprint(renders, cfg.split, ids)]
    key = stage_key(inputs, cfg.stage_params(), code)
    shards = tuple(tuple(ids[i : i + cfg.shard_size]) for i in range(0, len(ids), cfg.shard_size))
    return DatasetsPlan(key, scan_key, stage_dir(STAGE, key, settings), shards)


def scan_sample(ref: obman.SampleRef) -> tuple[str, str, float]:
    """Class, image name and visible share of one frame, admitted by obman.validate_sample first.

    Raises:
        BadSample: A missing or undecodable meta, segm or rgb, an unknown class, an empty segm.
    """
    sample = obman.validate_sample(ref, ("meta", "segm", "rgb"))
    cls = obman.qa_class(sample.meta, ref.meta_path)
    try:
        visibility = occlusion.visibility_ratio(sample.segm)
    except ValueError as exc:
        raise BadSample(ref.segm_path, str(exc), ref.sample_id) from exc
    return cls, ref.rgb_path.name, visibility


def scan_shard(root: Path, split: str, ids: tuple[str, ...]) -> ScanResult:
    """Read the meta, segm and rgb of one shard of samples; bad ones are quarantined and the rest go on."""
    report = StageReport(STAGE)
    rows = []
    root = Path(root).resolve()  # quarantine records name absolute files, as the stage key does
    with Timer() as timer:
        for sample_id in ids:
            try:
                cls, image, visibility = scan_sample(obman.SampleRef(root, split, sample_id))
            except BadSample as bad:
                report.quarantine(sample_id, bad.path, bad.reason)
                continue
            rows.append((sample_id, image, cls, visibility))
    report.ok, report.seconds = len(rows), timer.seconds
    table = pd.DataFrame(rows, columns=["id", "image", "cls", "visibility"])
    return ScanResult(
        table.astype({"id": "string", "image": "string", "cls": "string", "visibility": float}), report
    )


def _samples_table(scans: list[ScanResult], report: StageReport) -> pd.DataFrame:
    frames = [s.table for s in scans if len(s.table)]
    if not frames:
        first = report.quarantined[0] if report.quarantined else None
        raise StageError(
            f"no usable samples: every sample of the split was quarantined ({report.failed} of "
            f"{report.total}" + (f"; first: {first.path}: {first.reason})" if first else ")")
        )
    return pd.concat(frames, ignore_index=True).sort_values("id", ignore_index=True)


def _write(out_dir: Path, name: str, rows: pd.DataFrame, prompts: Prompts, image_root: Path) -> int:
    cot.check_rows(rows)
    return cot.write_dataset(
        out_dir / f"{name}.jsonl",
        cot.encode_rows(rows, prompts),
        cot.trl_table(rows, prompts, image_root),
        image_root,
    )


def build_outputs(cfg: DatasetsConfig, plan: DatasetsPlan, scans: list[ScanResult]) -> dict[str, Any]:
    """Grade the scanned samples, write every dataset and the statistics; return the summary.

    A no-op returning the saved summary when the stage directory is already complete.

    Raises:
        StageError: No usable sample, or the grader's input is missing.
    """
    if plan.done:
        return {**json.loads((plan.out_dir / SUMMARY).read_text()), "cached": True}
    with Timer() as timer:
        report = StageReport.merge(STAGE, [s.report for s in scans])
        table = _samples_table(scans, report)
        errors, errors_info = None, None
        if cfg.predictions is not None:
            errors, errors_info = occlusion.model_errors(
                cfg.predictions,
                table["id"].to_numpy(dtype=object),
                table["cls"].to_numpy(dtype=object),
                allow_partial=cfg.allow_partial_predictions,
            )
        try:
            grading = occlusion.grade(table["visibility"].to_numpy(dtype=float), errors, cfg.grader)
        except ValueError as exc:
            raise StageError(str(exc)) from exc
        table = table.assign(
            model_error=pd.array(errors if errors is not None else [None] * len(table), dtype="boolean"),
            unclear=pd.array(grading.unclear, dtype="boolean"),
        )
        # Before any file is written: a stage directory holds either a complete run or nothing.
        cot.check_not_degenerate(
            f"{Path(cfg.root) / cfg.split} (grader {cfg.grader.name})",
            table,
            report,
            labelled=True,
            allow=cfg.allow_degenerate,
            unit="sample",
            # The visibility grader's calibrated quantile always finds unclear images; a model may not.
            min_label=cfg.min_per_label if cfg.balance and cfg.grader.name == "model-errors" else 1,
        )
        out, prompts = plan.out_dir, cfg.prompts
        image_root = obman.SampleRef(cfg.root, cfg.split, table["id"].iloc[0]).rgb_path.parent.resolve()
        write_parquet_atomic(out / "samples.parquet", table)
        balanced = preference.balance_labels(table, cfg.balance_config()) if cfg.balance else table
        rows = {
            "sft1": _write(out, "sft1", cot.build_rows(table, "sft1"), prompts, image_root),
            "sft2": _write(out, "sft2", cot.build_rows(table, "sft2"), prompts, image_root),
        }
        if cfg.balance:
            rows["sft2_balanced"] = _write(
                out, "sft2_balanced", cot.build_rows(balanced, "sft2"), prompts, image_root
            )
        cot_rows = cot.build_rows(balanced, "cot", cfg.cot_config())
        rows["cot"] = _write(out, "cot", cot_rows, prompts, image_root)
        rows["sc"] = _write(
            out, "sc", cot.build_rows(table, "sc", cfg.cot_config(cfg.sc_limit)), prompts, image_root
        )
        rows["pairs"] = preference.write_pairs(out / "pairs.jsonl", balanced, prompts, image_root)
        renders_missing = None
        if cfg.renders is not None:
            view_rows = cot.view3d_rows(table, cfg.split)
            present = np.array([(cfg.renders / name).is_file() for name in view_rows["image"]], dtype=bool)
            renders_missing = int((~present).sum())
            rows["view3d"] = _write(
                out, "view3d", view_rows[present].reset_index(drop=True), prompts, Path(cfg.renders).resolve()
            )
        report.write_quarantine(out)
    labels = {"final": grading.unclear}
    if grading.model_error is not None:
        labels["model_errors"] = grading.model_error
    if grading.visibility_unclear is not None:
        labels["visibility"] = grading.visibility_unclear
    both = grading.model_error is not None and grading.visibility_unclear is not None
    summary = {
        "stage": STAGE,
        "key": plan.key,
        "out_dir": str(out),
        "split": cfg.split,
        "samples": len(table),
        "quarantined": len(report.quarantined),
        "quarantine_reasons": _reason_counts(report),
        "grader": cfg.grader.name,
        "threshold": None if grading.threshold is None else round(grading.threshold, 4),
        "threshold_source": grading.threshold_source,
        "unclear": int(grading.unclear.sum()),
        "unclear_rate": round(float(grading.unclear.mean()), 4),
        "model_errors": errors_info,
        "agreement": (
            occlusion.held_out_agreement(table["visibility"], grading.model_error, cfg.grader, cfg.seed)
            if both
            else None
        ),
        "unclear_by_class": occlusion.unclear_rates(table["cls"].to_numpy(dtype=object), labels),
        "balance": preference.balance_stats(table, balanced),
        "cot_rows": int((cot_rows["turns"] == "q0").sum()),
        "rows": rows,
        "renders_missing": renders_missing,
        "seconds": round(timer.seconds + report.seconds, 3),
        "cached": False,
    }
    write_json_atomic(out / SUMMARY, summary)
    return summary


def _reason_counts(report: StageReport) -> dict[str, int]:
    # Reasons name files and ids; their first clause is the kind of fault.
    counts: dict[str, int] = {}
    for item in report.quarantined:
        kind = item.reason.split(":")[0].split(" (")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def run(cfg: DatasetsConfig, settings: Settings | None = None) -> dict[str, Any]:
    """The whole stage as one call: plan, read every shard, grade, write; a no-op when already done."""
    stage_plan = plan(cfg, settings)
    if stage_plan.done:
        return build_outputs(cfg, stage_plan, [])
    scans = [scan_shard(cfg.root, cfg.split, shard) for shard in stage_plan.shards]
    return build_outputs(cfg, stage_plan, scans)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The statistics of a run as short text lines, for a terminal or a flow log."""
    lines = [
        f"datasets {summary['key']} ({'cached' if summary['cached'] else 'built'}): "
        f"{summary['samples']} samples, "
        f"{summary['quarantined']} quarantined, split {summary['split']} -> {summary['out_dir']}",
        f"grader {summary['grader']}: {summary['unclear']} unclear ({summary['unclear_rate']:.1%}), "
        f"threshold {summary['threshold']} ({summary['threshold_source']})",
        "rows: " + ", ".join(f"{name} {n}" for name, n in summary["rows"].items()),
    ]
    if summary["agreement"]:
        a = summary["agreement"]
        lines.append(
            f"grader agreement (model-errors vs visibility): {a['agreement']:.1%}, kappa {a['kappa']}"
        )
    for row in summary["unclear_by_class"]:
        rates = ", ".join(
            f"{k.removesuffix('_unclear_rate')} {v:.1%}"
            for k, v in row.items()
            if k.endswith("_unclear_rate") and v is not None
        )
        lines.append(f"  {row['class']:<10} {row['samples']:>7} samples; unclear: {rates or '-'}")
    total = summary["balance"][-1]
    lines.append(
        f"balance: yes/no {total['yes_before']}/{total['no_before']} "
        f"-> {total['yes_after']}/{total['no_after']}"
    )
    return lines


# Config field (its last location part) -> the option that sets it, where the two names differ.
_OPTION_OF_FIELD = {"name": "--grader"}


def config_from_options(**options: Any) -> DatasetsConfig:
    """The DatasetsConfig of a command line: ``grader`` names the grader, and options named after a
    GraderConfig field (``threshold``) set that field.

    Raises:
        click.UsageError: A value is invalid; one line naming the option and the reason (exit 2).
    """
    grading = {k: options.pop(k) for k in list(options) if k in GraderConfig.model_fields}
    if "grader" in options:
        grading["name"] = options.pop("grader")
    try:
        return DatasetsConfig(grader=GraderConfig(**grading), **options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_OPTION_OF_FIELD.get(str(e['loc'][-1]), '--' + str(e['loc'][-1]).replace('_', '-'))}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise click.UsageError(
            f"invalid value for {problems}", click.get_current_context(silent=True)
        ) from None


@click.command()
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help=field_help(DatasetsConfig, "root"),
)
@click.option("--split", default="train", show_default=True, help=field_help(DatasetsConfig, "split"))
@click.option(
    "--grader",
    type=click.Choice(occlusion.GRADERS),
    default="visibility",
    show_default=True,
    help=field_help(GraderConfig, "name"),
)
@click.option("--threshold", type=float, default=None, help=field_help(GraderConfig, "threshold"))
@click.option(
    "--predictions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help=field_help(DatasetsConfig, "predictions"),
)
@click.option(
    "--allow-partial-predictions", is_flag=True, help=field_help(DatasetsConfig, "allow_partial_predictions")
)
@click.option(
    "--renders",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=field_help(DatasetsConfig, "renders"),
)
@click.option(
    "--cot-fraction",
    type=float,
    default=0.25,
    show_default=True,
    help=field_help(DatasetsConfig, "cot_fraction"),
)
@click.option("--sc-limit", type=int, default=None, help=field_help(DatasetsConfig, "sc_limit"))
@click.option(
    "--balance/--no-balance", default=True, show_default=True, help=field_help(DatasetsConfig, "balance")
)
@click.option(
    "--stratify/--no-stratify", default=False, show_default=True, help=field_help(DatasetsConfig, "stratify")
)
@click.option("--seed", type=int, default=0, show_default=True, help=field_help(DatasetsConfig, "seed"))
@click.option("--allow-degenerate", is_flag=True, help=field_help(DatasetsConfig, "allow_degenerate"))
def cli(**options: Any) -> None:
    """Build every training dataset of one ObMan split and print the statistics."""
    cfg = config_from_options(**options)
    try:
        summary = run(cfg)
    except (StageError, BadSample) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("\n".join(summary_lines(summary)))


if __name__ == "__main__":
    cli()
