"""The method's three scores from prediction and truth files, with the upstream semantics exactly.

    occ evaluate score --predictions P.jsonl --truth T.jsonl

P rows are ``{"id", "q1", "clarity", "q1_3d"}``: the model's Q1 answer on the image (null: the image
could not be processed), its raw answer to the clarity question, and its Q1 answer on the view-0
render (absent or null: not asked, or no render). Other keys (``render``, ``error``) are ignored.
T rows are ``{"id", "answer"}`` with ``answer`` exactly ``The object is {class}.``. The rules
(docs/method-spec.md section 6):

- an answer is right only when it equals the truth string exactly, case and period included;
- clarity is lower-cased, trimmed and stripped of every ``.``, giving ``yes``, ``no`` or another word;
- description = Q1 accuracy over the processed images P (q1 not null);
- reflection = over P, Q1 right and clarity ``yes``, or Q1 wrong and clarity ``no``;
- decision = over the whole test set N: the final answer is q1 when clarity is ``yes``, q1_3d when it
  is ``no``; any other clarity, a missing render (q1_3d null) or an unprocessed image is wrong;
- 3D plus = accuracy of q1_3d over the processed images whose q1 was wrong (q1_3d not asked: wrong).

A truth id absent from P counts as unprocessed and is reported, never dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from occ_core.classes import QA_CLASSES, answer_for
from occ_core.cot import ANSWER_PATTERN
from occ_core.errors import BadSample
from occ_core.fsio import write_json_atomic
from occ_core.jsonl import iter_jsonl

PREDICTION_KEYS = ("q1", "clarity", "q1_3d")
# Confusion-matrix columns past the 8 classes: an answer that is none of the 8 exact strings, no answer.
OTHER, NONE = "other", "none"
SHOWN_IDS = 10  # ids listed in a report line; the counts are always complete


class ScoreInputError(ValueError):
    """A prediction or truth file that cannot be scored; the message names the file and the id."""


@dataclass(frozen=True)
class Prediction:
    """One image's answers: Q1 (None: not processed), raw clarity, Q1 on the render (None: none)."""

    id: str
    q1: str | None
    clarity: str | None
    q1_3d: str | None


def normalise_clarity(text: str | None) -> str:
    """The upstream parse of a clarity answer: lower-case, trim, delete every '.' (None gives '')."""
    return (text or "").lower().strip().replace(".", "")


def final_answer(p: Prediction) -> str | None:
    """q1 when clarity says yes, q1_3d when it says no, else no prediction (None)."""
    if p.q1 is None:
        return None
    clarity = normalise_clarity(p.clarity)
    if clarity == "yes":
        return p.q1
    if clarity == "no":
        return p.q1_3d
    return None


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not Path(path).is_file():
        raise ScoreInputError(f"{path}: no such file")
    rows = []
    for line_no, row in iter_jsonl(path):
        if isinstance(row, BadSample):
            raise ScoreInputError(str(row))
        rows.append((line_no, row))
    return rows


def _id(path: Path, line_no: int, row: dict[str, Any], seen: set[str]) -> str:
    sample_id = row.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        raise ScoreInputError(f"{path}: line {line_no}: 'id' must be a non-empty string, got {sample_id!r}")
    if sample_id in seen:
        raise ScoreInputError(f"{path}: line {line_no}: duplicate id {sample_id}")
    seen.add(sample_id)
    return sample_id


def read_truth(path: Path) -> dict[str, str]:
    """Truth rows ``{id, answer}`` as id -> answer, in file order.

    Raises:
        ScoreInputError: Malformed line, missing or duplicate id, or an answer that is not
            ``The object is {class}.`` with one of the 8 classes; names the file, line and id.
    """
    truth: dict[str, str] = {}
    seen: set[str] = set()
    for line_no, row in _rows(path):
        sample_id = _id(path, line_no, row, seen)
        answer = row.get("answer")
        match = ANSWER_PATTERN.fullmatch(answer) if isinstance(answer, str) else None
        if match is None or match["cls"] not in QA_CLASSES:
            raise ScoreInputError(
                f"{path}: line {line_no}: id {sample_id}: answer {answer!r} is not "
                f"'The object is {{class}}.' with one of {', '.join(QA_CLASSES)}"
            )
        truth[sample_id] = answer
    if not truth:
        raise ScoreInputError(f"{path}: no truth rows; there is nothing to score against")
    return truth


def read_predictions(path: Path, truth: dict[str, str], truth_path: Path | str = "truth") -> list[Prediction]:
    """Prediction rows checked against the truth ids.

    Raises:
        ScoreInputError: Malformed line, missing or duplicate id, an id the truth does not know, or a
            q1/clarity/q1_3d value that is neither a string nor null; names the file, line and id.
    """
    seen: set[str] = set()
    predictions = []
    for line_no, row in _rows(path):
        sample_id = _id(path, line_no, row, seen)
        if sample_id not in truth:
            raise ScoreInputError(f"{path}: line {line_no}: id {sample_id} is not in {truth_path}")
        values = {key: row.get(key) for key in PREDICTION_KEYS}
        for key, value in values.items():
            if value is not None and not isinstance(value, str):
                raise ScoreInputError(
                    f"{path}: line {line_no}: id {sample_id}: {key!r} must be a string or null, got {value!r}"
                )
        predictions.append(Prediction(sample_id, **values))
    return predictions


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _label(answer: str | None) -> str:
    if answer is None:
        return NONE
    match = ANSWER_PATTERN.fullmatch(answer)
    return match["cls"] if match and match["cls"] in QA_CLASSES else OTHER


def _confusion(pairs: list[tuple[str, str | None]]) -> dict[str, Any]:
    columns = [*QA_CLASSES, OTHER, NONE]
    counts = Counter((ANSWER_PATTERN.fullmatch(t)["cls"], _label(a)) for t, a in pairs)
    return {
        "rows": list(QA_CLASSES),
        "columns": columns,
        "matrix": [[counts[(r, c)] for c in columns] for r in QA_CLASSES],
    }


def score(predictions: list[Prediction], truth: dict[str, str]) -> dict[str, Any]:
    """Description, reflection, decision, 3D plus, per-class accuracy and confusion matrices.

    Args:
        predictions: Checked prediction rows (read_predictions); ids a subset of ``truth``.
        truth: id -> exact answer for the whole test set (N = its size).
    Returns:
        One JSON-ready dict; rates are None where their denominator is 0. Counts sit beside every rate.
    """
    by_id = {p.id: p for p in predictions}
    missing = [i for i in truth if i not in by_id]
    everyone = [by_id.get(i, Prediction(i, None, None, None)) for i in truth]
    processed = [p for p in everyone if p.q1 is not None]
    unprocessed = [p.id for p in everyone if p.q1 is None]
    right = {p.id for p in processed if p.q1 == truth[p.id]}
    clarity = {p.id: normalise_clarity(p.clarity) for p in processed}
    calibrated = sum(
        (p.id in right and clarity[p.id] == "yes") or (p.id not in right and clarity[p.id] == "no")
        for p in processed
    )
    finals = {p.id: final_answer(p) for p in everyone}
    decided = sum(finals[i] == truth[i] for i in truth)
    wrong = [p for p in processed if p.id not in right]
    recovered = sum(p.q1_3d == truth[p.id] for p in wrong)
    fallback = [p for p in processed if clarity[p.id] == "no"]
    no_render = [p.id for p in fallback if p.q1_3d is None]
    per_class = {}
    for name in QA_CLASSES:
        ids = [i for i in truth if truth[i] == answer_for(name)]
        seen = [i for i in ids if by_id.get(i) and by_id[i].q1 is not None]
        per_class[name] = {
            "n": len(ids),
            "processed": len(seen),
            "description": _rate(sum(i in right for i in seen), len(seen)),
            "decision": _rate(sum(finals[i] == truth[i] for i in ids), len(ids)),
        }
    kinds = Counter(c if c in ("yes", "no") else "other" for c in clarity.values())
    return {
        "description": _rate(len(right), len(processed)),
        "reflection": _rate(calibrated, len(processed)),
        "decision": _rate(decided, len(truth)),
        "three_d_plus": _rate(recovered, len(wrong)),
        "n": len(truth),
        "processed": len(processed),
        "counts": {
            "q1_correct": len(right),
            "reflection_correct": calibrated,
            "decision_correct": decided,
            "q1_wrong": len(wrong),
            "q1_3d_correct_when_q1_wrong": recovered,
            "q1_3d_asked_when_q1_wrong": sum(p.q1_3d is not None for p in wrong),
        },
        "clarity": {"yes": kinds["yes"], "no": kinds["no"], "other": kinds["other"]},
        "fallback": {"asked": len(fallback), "missing_render": len(no_render)},
        "unprocessed": {"count": len(unprocessed), "ids": unprocessed[:SHOWN_IDS]},
        "missing_from_predictions": {"count": len(missing), "ids": missing[:SHOWN_IDS]},
        "per_class": per_class,
        "confusion": {
            "q1": _confusion([(truth[p.id], p.q1) for p in processed]),
            "final": _confusion([(truth[i], finals[i]) for i in truth]),
        },
    }


def upstream_predictions(predictions: list[Prediction], truth: dict[str, str]) -> dict[str, str | None]:
    """The upstream predictions format ``{id: final answer}``; null where there is no prediction."""
    by_id = {p.id: p for p in predictions}
    return {i: final_answer(by_id[i]) if i in by_id else None for i in truth}


def output_paths(predictions_path: Path) -> tuple[Path, Path]:
    """Where the scores and the upstream predictions go: beside P, named after P's stem."""
    path = Path(predictions_path)
    return path.with_name(f"{path.stem}.scores.json"), path.with_name(f"{path.stem}.upstream.json")


def score_files(
    predictions_path: Path, truth_path: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Check both files, score them, and write the scores and the upstream predictions beside P.

    Args:
        predictions_path: P, rows ``{id, q1, clarity, q1_3d}``.
        truth_path: T, rows ``{id, answer}``.
        extra: Keys added to the scores as written (what produced P: checkpoint, settings, warnings).
    Returns:
        The scores (see ``score``) with the paths of the inputs and of the two files written.
    Raises:
        ScoreInputError: Either file is malformed (see read_truth and read_predictions).
    """
    truth = read_truth(Path(truth_path))
    predictions = read_predictions(Path(predictions_path), truth, truth_path)
    scores_path, upstream_path = output_paths(predictions_path)
    scores = {
        **score(predictions, truth),
        "files": {
            "predictions": str(predictions_path),
            "truth": str(truth_path),
            "scores": str(scores_path),
            "upstream": str(upstream_path),
        },
        **(extra or {}),
    }
    write_json_atomic(upstream_path, upstream_predictions(predictions, truth))
    write_json_atomic(scores_path, scores)
    return scores


def dumps_scores(scores: dict[str, Any]) -> str:
    """The scores as the one JSON line the commands print."""
    return json.dumps(scores, ensure_ascii=False)
