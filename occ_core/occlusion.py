"""Occlusion grading: which images get the clarity answer ``No.`` (unclear), by one of three graders.

Command (pick a visibility threshold from an earlier checkpoint's Q1 answers)::

    occ occlusion calibrate --samples STAGE_DIR/samples.parquet --predictions PREDICTIONS.json \
        [--allow-partial-predictions]
    python -m occ_core.occlusion calibrate ...

Graders, chosen by name:

- ``model-errors`` (the method's, method-spec 2.2): an image is unclear when an earlier checkpoint
  answered Q1 wrongly on it. Input: a predictions file (``{id: answer}``, the upstream
  ``predictions-*.json`` form) or an id list (``[{"answer": id}, ...]`` or ``[id, ...]``: the ids
  answered wrongly; every other id counts as answered right, so an id list cannot show coverage).
  A predictions file must name every image: one naming only some of them (another split's file whose
  id numbers collide, say) would make each image it lacks a "wrong" answer and label nearly all
  unclear. With ``allow_partial`` (``--allow-partial-predictions``) the images it lacks get no
  model-error label (NA, counted in ``missing``): calibration, agreement and unclear rates skip them,
  and the model-errors and combined graders, which need a label for every image, refuse them.
- ``visibility`` (new): the share of the object's full silhouette that is visible, i.e. pixels with
  segm channel 0 == 100 over pixels with channel 2 == 100 (docs/obman-moho.md A4); an image is
  unclear below the threshold. It needs no model, so it labels data before any checkpoint exists.
- ``combined``: ``any`` (either grader says unclear) or ``all`` (both say so).

The visibility threshold, when not set, is chosen in this order:

1. calibrated on model errors when they are available: the threshold with the largest Youden J
   (true-positive rate minus false-positive rate, i.e. the best balanced accuracy) at predicting
   which images the checkpoint got wrong (``choose_threshold``), provided that J reaches
   ``youden_floor`` (``calibrate_threshold``; the source then says the calibration was refused);
2. otherwise the visibility quantile that labels the method's own share of images unclear:
   28.85% (30,202 of the 104,671 train ids in the upstream ``checkpoint-30000`` error list,
   method-spec 2.2; the v1 10K labels give 25.2%). No model exists when the datasets are first
   built, so the error-predicting threshold cannot be measured then; matching the method's rate
   keeps the label balance of the original, and real ObMan keeps only frames with visibility above
   0.4 (obman-moho A1), so the quantile always falls inside the data's own range.

Grader agreement (model errors against visibility labels, ``held_out_agreement``) is measured on
images whose threshold was not fitted to their own errors: a threshold fitted to an image's error
agrees with it partly by construction, most of all when visibility predicts little.
"""

from __future__ import annotations

import json
import math
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

MIN_YOUDEN_J = 0.1
"""Smallest Youden J a calibrated threshold may have (balanced accuracy 0.55).

Below it visibility says almost nothing about which images the checkpoint got wrong: the J curve is
flat, so its maximum falls anywhere. On 10,140 images whose errors ignore visibility, the max-J
threshold labelled 4% to 91% of them unclear depending on the seed, while its J stayed under 0.035.
The method-rate quantile is used instead, which at least keeps the method's label balance.
"""

CHANCE_J_FACTOR = math.sqrt(-math.log(0.01) / 2)
"""Scale of the J that chance alone reaches: max J over thresholds is the one-sided two-sample
Kolmogorov-Smirnov statistic, which errors unrelated to visibility exceed with probability 1% only
past ``CHANCE_J_FACTOR * sqrt(1 / n_wrong + 1 / n_right)`` (0.03 on 10,140 images, 0.45 on 50)."""

AGREEMENT_FOLDS = 2
"""Folds of the held-out agreement: each fold's threshold is fitted on the others. Two keep each fit
on half the images, close to the full-set fit that labels the data."""


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
    """Clarity labels of a set of images, with every grader's own labels that could be computed.

    ``model_error`` is NA for images without a prediction (allowed partial coverage only).
    """

    unclear: np.ndarray
    model_error: pd.arrays.BooleanArray | None
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


def model_errors(
    path: Path | str, ids: np.ndarray, classes: np.ndarray, allow_partial: bool = False
) -> tuple[pd.arrays.BooleanArray, dict[str, Any]]:
    """Which images an earlier checkpoint answered Q1 wrongly, from a predictions file or an id list.

    Args:
        path: ``{id: answer}`` JSON (an answer is wrong unless it equals ``The object is {class}.``
            exactly) or an id list of the wrongly answered ids (every other id answered right).
        ids: Sample ids.
        classes: Their QA classes.
        allow_partial: Accept a predictions file that lacks some ids; they get no label (NA).
            Defaults to False.
    Returns:
        A nullable boolean array (True = wrong, NA = no prediction) and the file's coverage counts:
        ``covered``, ``missing`` and ``extra`` (its ids that are not sample ids) for predictions,
        ``listed`` and ``covered`` for an id list.
    Raises:
        BadSample: The file has the wrong shape, names none of the ids, or (unless allowed) lacks some.
    """
    data = read_json(path)
    ids = np.asarray(ids, dtype=object)
    if isinstance(data, dict):
        if not all(isinstance(v, str) for v in data.values()):
            raise BadSample(path, "predictions must map each id to an answer string")
        answers = [data.get(i) for i in ids]
        covered = sum(a is not None for a in answers)
        info = {"source": "predictions", "covered": covered, "missing": len(ids) - covered}
        info["extra"] = len(data) - covered
        errors = [None if a is None else a != answer_for(c) for a, c in zip(answers, classes, strict=True)]
    else:
        wrong = ids_from_list(data, path)
        covered = len(wrong & set(ids))
        info = {"source": "id-list", "listed": len(wrong), "covered": covered}
        errors = [i in wrong for i in ids]
    if len(ids) and covered == 0:
        raise BadSample(path, f"names none of the {len(ids)} sample ids: wrong split or wrong file?")
    if info.get("missing") and not allow_partial:
        raise BadSample(
            path,
            f"predictions name only {covered} of the {len(ids)} sample ids ({info['extra']} of its "
            f"{len(data)} ids are not sample ids): wrong split or wrong file? To use them anyway, with "
            "no model-error label on the other images, pass --allow-partial-predictions",
        )
    return pd.array(errors, dtype="boolean"), info


def split_labels(model_error: Any) -> tuple[np.ndarray, np.ndarray]:
    """Model-error labels (booleans, NA/None = no prediction) as two boolean arrays: wrong, labelled."""
    labels = pd.array(model_error, dtype="boolean")
    return labels.fillna(False).to_numpy(dtype=bool), ~labels.isna()


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


def youden_floor(n_wrong: int, n_right: int) -> float:
    """Smallest J a calibration on these counts may have: ``MIN_YOUDEN_J``, or chance level if higher."""
    return max(MIN_YOUDEN_J, CHANCE_J_FACTOR * math.sqrt(1 / n_wrong + 1 / n_right))


def calibrate_threshold(
    visibility: np.ndarray, model_error: Any, target_unclear_rate: float = METHOD_UNCLEAR_RATE
) -> tuple[float, str, list[dict[str, float]]]:
    """The max-J threshold when visibility does predict the errors, else the method-rate quantile.

    Args:
        visibility: Visible share per image.
        model_error: Whether the checkpoint answered each image wrongly; NA (no prediction) is skipped.
        target_unclear_rate: Unclear share of the fallback quantile. Defaults to the method's rate.
    Returns:
        The threshold, where it came from (saying why a calibration was refused) and the candidate
        table of ``choose_threshold`` (empty when the errors are all one outcome).
    """
    visibility = np.asarray(visibility, dtype=float)
    wrong, labelled = split_labels(model_error)
    fallback = rate_matched_threshold(visibility, target_unclear_rate)
    source = f"quantile matching the method's unclear rate {target_unclear_rate:.4f}"
    n_wrong, n_right = int(wrong.sum()), int((labelled & ~wrong).sum())
    if not (n_wrong and n_right):
        return fallback, f"{source}; calibration impossible: {n_wrong} wrong, {n_right} right answers", []
    threshold, table = choose_threshold(visibility[labelled], wrong[labelled])
    best_j, floor = max(row["youden_j"] for row in table), youden_floor(n_wrong, n_right)
    if best_j < floor:
        return (
            fallback,
            f"{source}; calibration refused: max Youden J {best_j:.4f} < floor {floor:.4f}",
            table,
        )
    return threshold, f"calibrated on model errors (max Youden J {best_j:.4f})", table


def resolve_threshold(visibility: np.ndarray, model_error: Any, cfg: GraderConfig) -> tuple[float, str]:
    """The visibility threshold to use and where it came from (config, calibration or method rate)."""
    if cfg.threshold is not None:
        return cfg.threshold, "config"
    if model_error is not None:
        return calibrate_threshold(visibility, model_error, cfg.target_unclear_rate)[:2]
    return rate_matched_threshold(visibility, cfg.target_unclear_rate), (
        f"quantile matching the method's unclear rate {cfg.target_unclear_rate:.4f}"
    )


def grade(visibility: np.ndarray | None, model_error: Any, cfg: GraderConfig) -> Grading:
    """Clarity labels by the configured grader; the other grader's labels too when its input exists.

    Args:
        visibility: Visible share per image, or None when no masks were read.
        model_error: Whether an earlier checkpoint answered each image wrongly (NA: no prediction),
            or None.
        cfg: Grader name, threshold and combination rule.
    Raises:
        ValueError: The chosen grader's input is missing, or lacks some images.
    """
    if cfg.name in ("model-errors", "combined") and model_error is None:
        raise ValueError(f"grader {cfg.name!r} needs model errors: give a predictions file or an id list")
    if cfg.name in ("visibility", "combined") and visibility is None:
        raise ValueError(f"grader {cfg.name!r} needs visibility from the segm masks")
    wrong = labels = None
    if model_error is not None:
        labels = pd.array(model_error, dtype="boolean")
        wrong, labelled = split_labels(labels)
        if cfg.name != "visibility" and not labelled.all():
            missing = int((~labelled).sum())
            raise ValueError(
                f"grader {cfg.name!r} needs a model-error label on every image, but {missing} of "
                f"{len(labels)} images have no prediction: use the visibility grader for partial predictions"
            )
    threshold, source, by_visibility = None, "n/a", None
    if visibility is not None and len(visibility):
        threshold, source = resolve_threshold(visibility, labels, cfg)
        by_visibility = np.asarray(visibility) < threshold
    if cfg.name == "model-errors":
        unclear = wrong
    elif cfg.name == "visibility":
        unclear = by_visibility
    else:
        unclear = (wrong | by_visibility) if cfg.combine == "any" else (wrong & by_visibility)
    if unclear is None:  # no images at all
        unclear = np.zeros(0, dtype=bool)
    return Grading(np.asarray(unclear, dtype=bool), labels, by_visibility, threshold, source)


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


def held_out_labels(
    visibility: np.ndarray, model_error: Any, cfg: GraderConfig, seed: int = 0, folds: int = AGREEMENT_FOLDS
) -> tuple[np.ndarray, list[str]]:
    """Visibility labels of the labelled images, each from a threshold not fitted to that image's error.

    A configured threshold saw no errors, so it labels every image. Otherwise the labelled images are
    cut into ``folds`` seeded random folds, and each fold is labelled by the threshold that
    ``resolve_threshold`` (calibration or its fallback) picks on the other folds.

    Args:
        visibility: Visible share per image.
        model_error: Whether the checkpoint answered each image wrongly; NA images are left out.
        cfg: Grader settings (threshold, target rate).
        seed: Seed of the fold assignment. Defaults to 0.
        folds: Number of folds. Defaults to ``AGREEMENT_FOLDS``.
    Returns:
        Unclear-by-visibility per labelled image (in order) and each fit's threshold source.
    """
    visibility = np.asarray(visibility, dtype=float)
    wrong, labelled = split_labels(model_error)
    visibility, wrong = visibility[labelled], wrong[labelled]
    if cfg.threshold is not None:
        return visibility < cfg.threshold, ["config"]
    fold = np.random.default_rng(seed).permutation(len(visibility)) % folds
    unclear, sources = np.zeros(len(visibility), dtype=bool), []
    for k in range(folds):
        held = fold == k
        if held.any() and not held.all():  # fewer images than folds leave some fold empty
            threshold, source = resolve_threshold(visibility[~held], wrong[~held], cfg)
            unclear[held] = visibility[held] < threshold
            sources.append(source)
    return unclear, sources


def held_out_agreement(
    visibility: np.ndarray, model_error: Any, cfg: GraderConfig, seed: int = 0, folds: int = AGREEMENT_FOLDS
) -> dict[str, Any]:
    """``agreement`` of model errors with visibility labels on held-out images (``held_out_labels``).

    Returns:
        The agreement counts over the labelled images, ``held_out`` (how they were held out) and
        ``fold_threshold_sources`` (where each fit's threshold came from, fallbacks included).
    """
    wrong, labelled = split_labels(model_error)
    unclear, sources = held_out_labels(visibility, model_error, cfg, seed, folds)
    how = (
        "not needed: a configured threshold saw no errors"
        if cfg.threshold is not None
        else f"{folds} folds, seed {seed}: each fold labelled by a threshold fitted on the rest"
    )
    return {**agreement(wrong[labelled], unclear), "held_out": how, "fold_threshold_sources": sources}


def unclear_rates(classes: np.ndarray, labels: dict[str, Any]) -> list[dict[str, Any]]:
    """Per class (and over all images): sample count and each labelling's unclear rate (NA skipped)."""
    classes = np.asarray(classes, dtype=object)
    split = {name: split_labels(values) for name, values in labels.items()}
    rows = []
    for cls in (*QA_CLASSES, "all"):
        mask = np.ones(len(classes), dtype=bool) if cls == "all" else classes == cls
        row: dict[str, Any] = {"class": cls, "samples": int(mask.sum())}
        for name, (unclear, labelled) in split.items():
            known = mask & labelled
            row[f"{name}_unclear_rate"] = round(float(np.mean(unclear[known])), 4) if known.any() else None
        rows.append(row)
    return rows


def calibrate(
    samples: Path, predictions: Path, allow_partial: bool = False
) -> tuple[float, str, list[dict[str, float]]]:
    """``calibrate_threshold`` on a checkpoint's Q1 errors and a datasets-stage ``samples.parquet``.

    Raises:
        BadSample: The predictions cannot be read, or (unless ``allow_partial``) lack some ids.
    """
    table = pd.read_parquet(samples, columns=["id", "cls", "visibility"]).dropna(subset=["visibility"])
    errors, _ = model_errors(
        predictions, table["id"].to_numpy(dtype=object), table["cls"].to_numpy(dtype=object), allow_partial
    )
    return calibrate_threshold(table["visibility"].to_numpy(dtype=float), errors)


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
@click.option(
    "--allow-partial-predictions",
    is_flag=True,
    help="accept predictions that lack some sample ids; those images are left out of the calibration",
)
def calibrate_command(samples: Path, predictions: Path, allow_partial_predictions: bool) -> None:
    """Print the threshold, where it came from, and the table it was chosen from (one JSON per line)."""
    try:
        threshold, source, table = calibrate(samples, predictions, allow_partial_predictions)
    except BadSample as exc:
        raise click.ClickException(str(exc)) from exc
    for row in table:
        click.echo(json.dumps(row))
    click.echo(
        json.dumps(
            {
                "threshold": threshold,
                "threshold_source": source,
                "help": field_help(GraderConfig, "threshold"),
            }
        )
    )


if __name__ == "__main__":
    cli()
