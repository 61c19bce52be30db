"""Occlusion grading: which images get the clarity answer ``No.`` (unclear), by one of three graders.

Command (pick a visibility threshold from an earlier checkpoint's Q1 answers)::

    occ occlusion calibrate --samples STAGE_DIR/samples.parquet --predictions PREDICTIONS.json
    python -m occ_core.occlusion calibrate ...

Graders, chosen by name:

- ``model-errors`` (the method's, method-spec 2.2): an image is unclear when an earlier checkpoint
  answered Q1 wrongly on it. Input: a predictions file (``{id: answer}``, the upstream
  ``predictions-*.json`` form; an id without a prediction counts as wrong, as in the method's
  evaluation) or an id list (``[{"answer": id}, ...]`` or ``[id, ...]``: the ids answered wrongly).
- ``visibility`` (new): the share of the object's full silhouette that is visible, i.e. pixels with
  segm channel 0 == 100 over pixels with channel 2 == 100 (docs/obman-moho.md A4); an image is
  unclear below the threshold. It needs no model, so it labels data before any checkpoint exists.
- ``combined``: ``any`` (either grader says unclear) or ``all`` (both say so).

The visibility threshold, when not set, is chosen in this order:

1. calibrated on model errors when they are available: the threshold with the largest Youden J
   (true-positive rate minus false-positive rate, i.e. the best balanced accuracy) at predicting
   which images the checkpoint got wrong (``choose_threshold``);
2. otherwise the visibility quantile that labels the method's own share of images unclear:
   28.85% (30,202 of the 104,671 train ids in the upstream ``checkpoint-30000`` error list,
   method-spec 2.2; the v1 10K labels give 25.2%). No model exists when the datasets are first
   built, so the error-predicting threshold cannot be measured then; matching the method's rate
   keeps the label balance of the original, and real ObMan keeps only frames with visibility above
   0.4 (obman-moho A1), so the quantile always falls inside the data's own range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from occ_core.classes import QA_CLASSES, answer_for
from occ_core.config import field_help
from occ_core.cot import ids_from_list, read_json
from occ_core.errors import BadSample
from occ_core.obman import OBJECT_LABEL

METHOD_UNCLEAR_RATE = 30202 / 104671
GRADERS = ("model-errors", "visibility", "combined")


class GraderConfig(BaseModel):
    """Which grader labels clarity, and its visibility threshold."""

    model_config = ConfigDict(frozen=True)

    name: Literal["model-errors", "visibility", "combined"] = Field(
        "visibility", description="grader: model-errors (the method's), visibility (segm masks) or combined"
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="visible share of the object below which an image is unclear; None: calibrated on model "
        "errors when available, else the quantile giving the method's unclear rate",
    )
    target_unclear_rate: float = Field(
        METHOD_UNCLEAR_RATE,
        gt=0.0,
        lt=1.0,
        description="unclear share the default threshold reproduces (method: 30,202 / 104,671 = 28.85%)",
    )
    combine: Literal["any", "all"] = Field(
        "any", description="combined grader: unclear when any grader says so, or only when all do"
    )


@dataclass(frozen=True)
class Grading:
    """Clarity labels of a set of images, with every grader's own labels that could be computed."""

    unclear: np.ndarray
    model_error: np.ndarray | None
    visibility_unclear: np.ndarray | None
    threshold: float | None
    threshold_source: str


def visibility_ratio(segm: np.ndarray) -> float:
    """Visible object pixels (channel 0 == 100) over the full object silhouette (channel 2 == 100).

    Args:
        segm: (H, W, 3) label image in ObMan channel order (0 = scene, 1 = hand-only, 2 = object-only).
    Raises:
        ValueError: The object-only channel has no object pixels.
    """
    silhouette = np.count_nonzero(segm[..., 2] == OBJECT_LABEL)
    if silhouette == 0:
        raise ValueError("object-only mask (segm channel 2) has no object pixels")
    return min(1.0, np.count_nonzero(segm[..., 0] == OBJECT_LABEL) / silhouette)


def model_errors(path: Path | str, ids: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Which images an earlier checkpoint answered Q1 wrongly, from a predictions file or an id list.

    Args:
        path: ``{id: answer}`` JSON (an answer is wrong unless it equals ``The object is {class}.``
            exactly; a missing id counts as wrong) or an id list of the wrongly answered ids.
        ids: Sample ids.
        classes: Their QA classes.
    Returns:
        A boolean array (True = wrong) and counts describing the file's coverage.
    Raises:
        BadSample: The file has the wrong shape, or names none of the ids.
    """
    data = read_json(path)
    ids = np.asarray(ids, dtype=object)
    if isinstance(data, dict):
        if not all(isinstance(v, str) for v in data.values()):
            raise BadSample(path, "predictions must map each id to an answer string")
        predicted = np.array([data.get(i) for i in ids], dtype=object)
        expected = np.array([answer_for(c) for c in classes], dtype=object)
        covered = int(sum(p is not None for p in predicted))
        info = {"source": "predictions", "covered": covered, "missing": len(ids) - covered}
        errors = predicted != expected
    else:
        wrong = ids_from_list(data, path)
        covered = len(wrong & set(ids))
        info = {"source": "id-list", "listed": len(wrong), "covered": covered}
        errors = np.array([i in wrong for i in ids], dtype=bool)
    if len(ids) and covered == 0:
        raise BadSample(path, f"names none of the {len(ids)} sample ids: wrong split or wrong file?")
    return errors.astype(bool), info


def rate_matched_threshold(visibility: np.ndarray, rate: float) -> float:
    """The visibility below which a share ``rate`` of the images lies."""
    return float(np.quantile(np.asarray(visibility, dtype=float), rate))


def choose_threshold(
    visibility: np.ndarray, is_error: np.ndarray, candidates: np.ndarray | None = None
) -> tuple[float, list[dict[str, float]]]:
    """The threshold that best predicts model errors: the largest Youden J (TPR - FPR).

    Args:
        visibility: Visible share per image.
        is_error: Whether the checkpoint answered that image wrongly.
        candidates: Thresholds to try; default the 1st..99th percentiles of ``visibility``.
    Returns:
        The best threshold (the lowest one on a tie) and one table row per candidate: threshold,
        unclear_rate, tpr, fpr, youden_j, balanced_accuracy.
    Raises:
        ValueError: The errors are all True or all False, so no threshold can be measured.
    """
    visibility, is_error = np.asarray(visibility, dtype=float), np.asarray(is_error, dtype=bool)
    if is_error.all() or not is_error.any():
        raise ValueError("choosing a threshold needs both wrongly and rightly answered images")
    if candidates is None:
        candidates = np.unique(np.quantile(visibility, np.linspace(0.01, 0.99, 99)))
    candidates = np.asarray(candidates, dtype=float)
    wrong, right = np.sort(visibility[is_error]), np.sort(visibility[~is_error])
    tpr = np.searchsorted(wrong, candidates, side="left") / len(wrong)
    fpr = np.searchsorted(right, candidates, side="left") / len(right)
    rate = (tpr * len(wrong) + fpr * len(right)) / len(visibility)
    youden = tpr - fpr
    table = [
        {
            "threshold": round(float(t), 4),
            "unclear_rate": round(float(r), 4),
            "tpr": round(float(a), 4),
            "fpr": round(float(b), 4),
            "youden_j": round(float(j), 4),
            "balanced_accuracy": round(float(0.5 + j / 2), 4),
        }
        for t, r, a, b, j in zip(candidates, rate, tpr, fpr, youden, strict=True)
    ]
    return float(candidates[int(np.argmax(youden))]), table


def resolve_threshold(
    visibility: np.ndarray, model_error: np.ndarray | None, cfg: GraderConfig
) -> tuple[float, str]:
    """The visibility threshold to use and where it came from (config, calibration or method rate)."""
    if cfg.threshold is not None:
        return cfg.threshold, "config"
    if model_error is not None and model_error.any() and not model_error.all():
        return choose_threshold(visibility, model_error)[0], "calibrated on model errors (max Youden J)"
    return rate_matched_threshold(visibility, cfg.target_unclear_rate), (
        f"quantile matching the method's unclear rate {cfg.target_unclear_rate:.4f}"
    )


def grade(visibility: np.ndarray | None, model_error: np.ndarray | None, cfg: GraderConfig) -> Grading:
    """Clarity labels by the configured grader; the other grader's labels too when its input exists.

    Args:
        visibility: Visible share per image, or None when no masks were read.
        model_error: Whether an earlier checkpoint answered each image wrongly, or None.
        cfg: Grader name, threshold and combination rule.
    Raises:
        ValueError: The chosen grader's input is missing.
    """
    if cfg.name in ("model-errors", "combined") and model_error is None:
        raise ValueError(f"grader {cfg.name!r} needs model errors: give a predictions file or an id list")
    if cfg.name in ("visibility", "combined") and visibility is None:
        raise ValueError(f"grader {cfg.name!r} needs visibility from the segm masks")
    threshold, source, by_visibility = None, "n/a", None
    if visibility is not None and len(visibility):
        threshold, source = resolve_threshold(visibility, model_error, cfg)
        by_visibility = np.asarray(visibility) < threshold
    if cfg.name == "model-errors":
        unclear = model_error
    elif cfg.name == "visibility":
        unclear = by_visibility
    else:
        unclear = (model_error | by_visibility) if cfg.combine == "any" else (model_error & by_visibility)
    if unclear is None:  # no images at all
        unclear = np.zeros(0, dtype=bool)
    return Grading(np.asarray(unclear, dtype=bool), model_error, by_visibility, threshold, source)


def agreement(first: np.ndarray, second: np.ndarray) -> dict[str, float | int]:
    """How often two graders agree: raw agreement, Cohen's kappa and the 2x2 counts."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    n = len(first)
    agree = float(np.mean(first == second)) if n else 0.0
    chance = float(first.mean() * second.mean() + (1 - first.mean()) * (1 - second.mean())) if n else 0.0
    kappa = (agree - chance) / (1 - chance) if chance < 1 else 1.0
    return {
        "samples": n,
        "agreement": round(agree, 4),
        "kappa": round(kappa, 4),
        "both_unclear": int(np.sum(first & second)),
        "only_first": int(np.sum(first & ~second)),
        "only_second": int(np.sum(~first & second)),
        "both_clear": int(np.sum(~first & ~second)),
    }


def unclear_rates(classes: np.ndarray, labels: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per class (and over all images): sample count and each labelling's unclear rate."""
    classes = np.asarray(classes, dtype=object)
    rows = []
    for cls in (*QA_CLASSES, "all"):
        mask = np.ones(len(classes), dtype=bool) if cls == "all" else classes == cls
        row: dict[str, Any] = {"class": cls, "samples": int(mask.sum())}
        for name, values in labels.items():
            row[f"{name}_unclear_rate"] = round(float(np.mean(values[mask])), 4) if mask.any() else None
        rows.append(row)
    return rows


def calibrate(samples: Path, predictions: Path) -> tuple[float, list[dict[str, float]]]:
    """Threshold that best predicts a checkpoint's Q1 errors, from a datasets-stage ``samples.parquet``."""
    table = pd.read_parquet(samples, columns=["id", "cls", "visibility"]).dropna(subset=["visibility"])
    errors, _ = model_errors(
        predictions, table["id"].to_numpy(dtype=object), table["cls"].to_numpy(dtype=object)
    )
    return choose_threshold(table["visibility"].to_numpy(dtype=float), errors)


@click.group()
def cli() -> None:
    """Occlusion grading: calibrate the visibility threshold against a checkpoint's errors."""


@cli.command("calibrate")
@click.option(
    "--samples",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="samples.parquet of a datasets stage run (id, cls, visibility)",
)
@click.option(
    "--predictions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="{id: answer} predictions of an earlier checkpoint, or the list of ids it got wrong",
)
def calibrate_command(samples: Path, predictions: Path) -> None:
    """Print the best threshold and the table it was chosen from (one JSON object per line)."""
    threshold, table = calibrate(samples, predictions)
    for row in table:
        click.echo(json.dumps(row))
    click.echo(json.dumps({"threshold": threshold, "help": field_help(GraderConfig, "threshold")}))


if __name__ == "__main__":
    cli()
