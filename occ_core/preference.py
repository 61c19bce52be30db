"""Preference pairs for MPO from SFT2 rows, and the seeded balancing of the clarity labels.

Command (writes PAIRS.jsonl, PAIRS.parquet for trl and PAIRS.meta.json for InternVL)::

    occ pairs build --source SFT2.jsonl --out PAIRS.jsonl [--balance/--no-balance] [--seed N] [--stratify]
        [--allow-degenerate]
    python -m occ_core.preference build ...

A pair row is ``{"image", "question", "chosen", "rejected"}``: the question is Q6 with a trailing
newline and no image token (the MPO loader puts ``<image>\\n`` in front), ``chosen`` is the row's
clarity answer and ``rejected`` the other one (docs/method-spec.md 2.4). There is no id and no Q1 turn.

Balancing is the method's rule (method-spec 2.3): the majority clarity label is downsampled to the
size of the minority and the result shuffled. Upstream drew it with an unseeded ``random.sample``;
here every draw takes the seed. ``stratify`` draws the kept majority rows per class, in proportion to
each class's share of the majority label (largest remainders, at least one row for every class that
has one), so a rare class cannot vanish by chance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from occ_core.classes import QA_CLASSES
from occ_core.cot import (
    MESSAGES,
    NO,
    YES,
    CotConfig,
    DegenerateOutput,
    Prompts,
    check_not_degenerate,
    check_rows,
    drop_unlabelled,
    field_help,
    image_paths,
    read_rows,
    write_dataset,
    write_sidecar_quarantine,
)
from occ_core.errors import StageError
from occ_core.jsonl import dumps, join_pieces, json_strings, string_array
from occ_core.stage import StageReport, Timer

_BALANCE_STREAM = 0xBA1  # separates the balancing draw from other seeded draws on the same seed


class BalanceConfig(BaseModel):
    """How the clarity labels are balanced before pairs (and the balanced SFT2/CoT sets) are built."""

    model_config = ConfigDict(frozen=True)

    balance: bool = Field(
        True, description="downsample the majority clarity label to the minority (the method's rule)"
    )
    stratify: bool = Field(
        False, description="draw the kept majority rows per class, so rare classes are kept"
    )
    seed: int = Field(0, ge=0, description="seed of the balancing draw and shuffle; part of the stage key")


def allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` draws over groups of sizes ``counts`` in proportion, with at least one per non-empty group.

    Largest remainders decide the rounding; the at-least-one floor holds whenever ``n`` is at least the
    number of non-empty groups, and is paid for by the groups with the smallest remainders.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if n > total:
        raise ValueError(f"cannot draw {n} rows from {total}")
    quota = counts * (n / total) if total else np.zeros(len(counts))
    alloc = np.floor(quota).astype(np.int64)
    if n >= np.count_nonzero(counts):
        alloc = np.maximum(alloc, (counts > 0).astype(np.int64))
    while alloc.sum() > n:
        excess = np.where(alloc > 1, alloc - quota, -np.inf)
        alloc[np.argmax(excess)] -= 1
    while alloc.sum() < n:
        shortfall = np.where(alloc < counts, quota - alloc, -np.inf)
        alloc[np.argmax(shortfall)] += 1
    return alloc


def balance_labels(table: pd.DataFrame, cfg: BalanceConfig | None = None) -> pd.DataFrame:
    """The method's balancing: keep every minority-label row and as many majority rows, then shuffle.

    Args:
        table: Sample table with a non-null ``unclear`` column.
        cfg: Seed and whether to stratify the draw by class.
    Returns:
        The balanced table, shuffled with the seed.
    """
    cfg = cfg or BalanceConfig()
    if table["unclear"].isna().any():
        raise ValueError("balancing needs a clarity label on every row")
    rng = np.random.default_rng([cfg.seed, _BALANCE_STREAM])
    unclear = table["unclear"].to_numpy(dtype=bool)
    minority, majority = sorted((np.flatnonzero(unclear), np.flatnonzero(~unclear)), key=len)
    n = len(minority)
    if cfg.stratify:
        classes = table["cls"].to_numpy(dtype=object)[majority]
        groups = [majority[classes == c] for c in QA_CLASSES]
        alloc = allocate(np.array([len(g) for g in groups]), n)
        kept = np.concatenate([rng.choice(g, k, replace=False) for g, k in zip(groups, alloc, strict=True)])
    else:
        kept = rng.choice(majority, n, replace=False)
    order = np.concatenate([minority, kept.astype(np.int64)])
    rng.shuffle(order)
    return table.iloc[order].reset_index(drop=True)


def label_counts(table: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """Per class: (rows labelled ``Yes.``, rows labelled ``No.``)."""
    counts = {}
    for cls in QA_CLASSES:
        labels = table["unclear"][table["cls"] == cls].to_numpy(dtype=bool)
        counts[cls] = (int((~labels).sum()), int(labels.sum()))
    return counts


def balance_stats(before: pd.DataFrame, after: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows per class and clarity answer before and after balancing, plus a total row."""
    first, second = label_counts(before), label_counts(after)
    rows = [
        {
            "class": cls,
            "yes_before": first[cls][0],
            "no_before": first[cls][1],
            "yes_after": second[cls][0],
            "no_after": second[cls][1],
        }
        for cls in QA_CLASSES
    ]
    rows.append({key: ("total" if key == "class" else sum(r[key] for r in rows)) for key in rows[0]})
    return rows


def _pair_answers(unclear: bool) -> tuple[str, str]:
    return (NO, YES) if unclear else (YES, NO)


def encode_pairs(table: pd.DataFrame, prompts: Prompts) -> list[str]:
    """JSONL pair lines ``{"image", "question", "chosen", "rejected"}``, byte-identical to ``jsonl.dumps``."""
    question = dumps(prompts.pair_question())
    tails = [
        f', "question": {question}, "chosen": {dumps(chosen)}, "rejected": {dumps(rejected)}}}'
        for chosen, rejected in (_pair_answers(False), _pair_answers(True))
    ]
    labels = pa.array(table["unclear"].to_numpy(dtype=bool).astype(np.int64))
    return join_pieces(['{"image": ', json_strings(table["image"]), pa.array(tails).take(labels)])


def pairs_trl_table(table: pd.DataFrame, prompts: Prompts, image_root: Path | None) -> pa.Table:
    """trl preference table: ``id``, ``images``, ``prompt``, ``chosen``, ``rejected`` (conversational)."""
    unclear = table["unclear"].to_numpy(dtype=bool)
    prompt = [{"role": "user", "content": prompts.q6}]
    answers = [[{"role": "assistant", "content": a}] for a in (YES, NO)]
    by_label = pa.array(unclear.astype(np.int64))
    return pa.table(
        {
            "id": string_array(table["id"]),
            "images": image_paths(table["image"], image_root),
            "prompt": pa.array([prompt], MESSAGES).take(pa.array(np.zeros(len(table), dtype=np.int64))),
            "chosen": pa.array(answers, MESSAGES).take(by_label),
            "rejected": pa.array(answers[::-1], MESSAGES).take(by_label),
        }
    )


def write_pairs(out: Path, table: pd.DataFrame, prompts: Prompts, image_root: Path | None) -> int:
    """Check and write the pairs of a labelled sample table (JSONL, Parquet, meta.json); return the count."""
    check_rows(table)
    if table["unclear"].isna().any():
        raise StageError("every pair needs a clarity label")
    return write_dataset(
        out, encode_pairs(table, prompts), pairs_trl_table(table, prompts, image_root), image_root
    )


def build(
    source: Path,
    out: Path,
    cfg: BalanceConfig | None = None,
    *,
    prompts: Prompts | None = None,
    image_root: Path | None = None,
    allow_degenerate: bool = False,
) -> StageReport:
    """Pairs from SFT2 rows, balanced first unless ``cfg.balance`` is off (the call behind
    ``occ pairs build``).

    Rows without a Q6 turn answered ``Yes.``/``No.`` are quarantined (upstream skipped them silently).

    Raises:
        DegenerateOutput: The labelled rows hold one clarity answer only (no pair could be balanced,
            every chosen answer would be the same) or none at all, and ``allow_degenerate`` is off;
            nothing is written but the quarantine sidecar.
    """
    cfg, prompts = cfg or BalanceConfig(), prompts or Prompts()
    with Timer() as timer:
        table, report = read_rows(source, prompts, image_root)
        table = drop_unlabelled(table, report, source)
        write_sidecar_quarantine(out, report)
        check_not_degenerate(out, table, report, labelled=True, allow=allow_degenerate)
        balanced = balance_labels(table, cfg) if cfg.balance else table
        report.ok = write_pairs(out, balanced, prompts, image_root)
    report.stage, report.seconds = "pairs", timer.seconds
    report.extra.update(
        rows_before=len(table),
        chosen_no=int(balanced["unclear"].sum()),
        chosen_yes=int((~balanced["unclear"].to_numpy(dtype=bool)).sum()),
    )
    report.extra["balance"] = balance_stats(table, balanced)
    return report


@click.group()
def cli() -> None:
    """Build MPO preference pairs from SFT2 rows."""


@cli.command("build")
@click.option(
    "--source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="SFT2 rows: Q1, its answer, Q6 and Yes./No.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="output pairs JSONL"
)
@click.option(
    "--balance/--no-balance", default=True, show_default=True, help=field_help(BalanceConfig, "balance")
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help=field_help(BalanceConfig, "seed")
)
@click.option(
    "--stratify/--no-stratify", default=False, show_default=True, help=field_help(BalanceConfig, "stratify")
)
@click.option(
    "--image-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="image folder: rows whose image is missing there are quarantined; written into meta.json",
)
@click.option("--allow-degenerate", is_flag=True, help=field_help(CotConfig, "allow_degenerate"))
def build_command(
    source: Path,
    out: Path,
    balance: bool,
    seed: int,
    stratify: bool,
    image_root: Path | None,
    allow_degenerate: bool,
) -> None:
    """Write OUT (pairs JSONL), OUT.parquet (trl) and OUT.meta.json (InternVL)."""
    try:
        report = build(
            source,
            out,
            BalanceConfig(balance=balance, seed=seed, stratify=stratify),
            image_root=image_root,
            allow_degenerate=allow_degenerate,
        )
    except DegenerateOutput as exc:
        raise click.ClickException(str(exc)) from exc
    stats = report.extra.pop("balance")
    click.echo(json.dumps(report.summary()))
    for row in stats:
        click.echo("  ".join(f"{k}={v}" for k, v in row.items()))
    for item in report.quarantined[:10]:
        click.echo(f"quarantined {item.sample_id}: {item.path}: {item.reason}", err=True)


if __name__ == "__main__":
    cli()
