"""Clarity labels from the model's own errors, as the method makes them, without grading on seen data.

Upstream labels an image "unclear" when the SFT1 checkpoint answered its Q1 wrongly on the training
images. A model that fits its training split finds no errors there, so occ cross-predicts: the split
is cut into k seeded folds, one SFT1 model per fold trains on the other k-1 folds with the same
settings, and answers Q1 on its held-out fold. The answers (``{id: answer}``) feed the datasets
stage's model-errors grader (``occ datasets --predictions``), which rebuilds SFT2, the balanced set
and the pairs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from occ_core.fsio import write_json_atomic
from occ_core.train.config import TrainConfig
from occ_core.train.data import TrainingData

FOLDS_DIR = "folds"  # under a stage's OUT: one model per fold and the predictions file
PREDICTIONS = "train_predictions.json"


def folds_of(ids: list[str], k: int, seed: int) -> list[list[str]]:
    """``k`` disjoint folds covering every id, drawn with ``seed`` (sorted within each fold)."""
    if k < 2:
        raise ValueError(f"cross-prediction needs at least 2 folds, got {k}")
    if len(ids) < k:
        raise ValueError(f"{len(ids)} samples cannot be cut into {k} folds")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def cross_predict(cfg: TrainConfig, training: TrainingData, k: int, out: Path) -> dict[str, Any]:
    """Train one SFT1 per fold, predict its held-out fold, write ``OUT/train_predictions.json``.

    Each fold's model lives in ``OUT/fold-<i>`` (resumable like any stage). Returns the per-fold
    accuracies and the error count.
    """
    from occ_core.train.predict import accuracy_report, evaluate_rows, reference_answers
    from occ_core.train.run import train

    out = Path(out)
    by_id = {row["id"]: row for row in training.rows}
    predictions: dict[str, str] = {}
    folds = []
    for index, held_out in enumerate(folds_of(list(by_id), k, cfg.seed)):
        held = set(held_out)
        rows = [row for row in training.rows if row["id"] not in held]
        subset = TrainingData(f"{training.name}-fold{index}", training.path, rows, training.label_counts)
        fold_dir = out / f"fold-{index}"
        train(cfg.model_copy(update={"out": fold_dir}), training=subset)
        test_rows = [by_id[i] for i in held_out]
        answers = evaluate_rows(fold_dir, test_rows, cfg.preset)
        predictions.update(zip(held_out, answers, strict=True))
        folds.append({"fold": index, **accuracy_report(answers, reference_answers(test_rows))})
    write_json_atomic(out / PREDICTIONS, predictions)
    truth = {row["id"]: t for row, t in zip(training.rows, reference_answers(training.rows), strict=True)}
    errors = sum(predictions[i] != truth[i] for i in predictions)
    return {
        "folds": folds,
        "predictions": str(out / PREDICTIONS),
        "errors": errors,
        "samples": len(predictions),
    }
