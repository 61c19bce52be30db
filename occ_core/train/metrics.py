"""Training metrics beside the checkpoint: ``metrics.jsonl``, ``loss_curve.png`` and table rows.

TensorBoard event files come from the trainer itself (``report_to="tensorboard"``, under
``OUT/tensorboard``); this module turns the trainer's log history into the other three forms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from occ_core.fsio import atomic_path, write_jsonl_atomic

# What a curve or a table shows per stage; MPO adds the preference metrics trl logs, SC its attempts'.
SC_KEYS = ("reward_attempt1", "reward_attempt2", "improvement_rate", "fixed", "broken", "kl")
CURVES = ("loss", "grad_norm", "learning_rate", "rewards/margins", "rewards/accuracies", *SC_KEYS[:3], "kl")
TABLE_KEYS = (
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    *SC_KEYS,
)


def step_records(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step records of a trainer's log history (the end-of-run summary left out)."""
    return [dict(r) for r in log_history if "loss" in r and "train_loss" not in r]


def read_records(out: Path) -> list[dict[str, Any]]:
    """The per-step records a finished stage wrote to ``OUT/metrics.jsonl``."""
    import json

    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a Prefect table artifact: one per logged step, rounded."""
    rows = []
    for record in records:
        row = {k: record[k] for k in TABLE_KEYS if k in record}
        rows.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def plot_curves(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """A PNG with one panel per logged curve (loss, grad norm, lr; MPO margins and accuracies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [k for k in CURVES if any(k in r for r in records)]
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, key in zip(axes[0], curves, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def write_metrics(log_history: list[dict[str, Any]], out: Path, title: str) -> dict[str, Any]:
    """Write ``metrics.jsonl`` and ``loss_curve.png`` into ``out``; return first/last loss and paths."""
    records = step_records(log_history)
    write_jsonl_atomic(Path(out) / "metrics.jsonl", records)
    png = plot_curves(records, Path(out) / "loss_curve.png", title)
    losses = [r["loss"] for r in records]
    return {
        "steps_logged": len(records),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "loss_curve": str(png) if png else None,
    }


def throughput(train_metrics: dict[str, Any], device: str) -> dict[str, Any]:
    """The trainer's runtime and samples (pairs for mpo) per second, and the process's peak GPU memory.

    Args:
        train_metrics: ``TrainOutput.metrics`` of ``trainer.train()``.
        device: ``cuda`` or ``cpu``; on cpu ``peak_memory_gib`` is None.
    """
    import torch

    peak = None
    if device == "cuda":
        peak = {
            "allocated": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "reserved": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        }
    return {
        "train_runtime": train_metrics.get("train_runtime"),
        "train_samples_per_second": train_metrics.get("train_samples_per_second"),
        "peak_memory_gib": peak,
    }
