"""Scores of occ_core.evaluate.score on a hand-computed example, and the checks of both input files.

.venv/bin/python -m pytest tests/unit/evaluate/test_score.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from occ_core.cli import main
from occ_core.evaluate.score import ScoreInputError, score_files

TRUTH = {
    "a": "bottle",
    "b": "bowl",
    "c": "can",
    "d": "jar",
    "e": "knife",
    "f": "camera",
    "g": "remote",
    "h": "cellphone",  # absent from the predictions file
    "i": "bottle",  # q1 null: not processed
}
PREDICTIONS = [
    # right, "Yes." -> yes: reflection right, final = q1 right
    {"id": "a", "q1": "The object is bottle.", "clarity": "Yes.", "q1_3d": None},
    # lower-case answer: wrong; " No. " -> no: reflection right; render answer right -> final right
    {"id": "b", "q1": "the object is bowl.", "clarity": " No. ", "q1_3d": "The object is bowl."},
    # no period: wrong; "Yes, it is." -> "yes, it is": neither -> reflection wrong, no final answer
    {"id": "c", "q1": "The object is can", "clarity": "Yes, it is."},
    # right, "yes." -> yes: reflection right, final right
    {"id": "d", "q1": "The object is jar.", "clarity": "yes.", "q1_3d": None},
    # wrong class, "No." -> no: reflection right; render missing (q1_3d null) -> final wrong
    {"id": "e", "q1": "The object is bowl.", "clarity": "No.", "q1_3d": None, "render": None},
    # right, "YES" -> yes
    {"id": "f", "q1": "The object is camera.", "clarity": "YES", "q1_3d": None},
    # right, no clarity at all -> reflection wrong, no final answer
    {"id": "g", "q1": "The object is remote."},
    {"id": "i", "q1": None, "clarity": None, "q1_3d": None, "error": "image unreadable"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    truth = _write(
        tmp_path / "truth.jsonl", [{"id": i, "answer": f"The object is {c}."} for i, c in TRUTH.items()]
    )
    return _write(tmp_path / "preds.jsonl", PREDICTIONS), truth


def test_hand_computed_scores(files: tuple[Path, Path]) -> None:
    scores = score_files(*files)
    # P = {a..g} (7 processed), N = 9. Q1 right: a, d, f, g.
    assert (scores["n"], scores["processed"]) == (9, 7)
    assert scores["description"] == pytest.approx(4 / 7)
    # Calibrated: a (right, yes), b (wrong, no), d (right, yes), e (wrong, no), f (right, yes).
    assert scores["reflection"] == pytest.approx(5 / 7)
    # Final right: a, b (render), d, f; c, g (clarity neither), e (no render), h, i (unprocessed) wrong.
    assert scores["decision"] == pytest.approx(4 / 9)
    # Q1 wrong: b, c, e; the render answer is right for b only.
    assert scores["three_d_plus"] == pytest.approx(1 / 3)
    assert scores["counts"] == {
        "q1_correct": 4,
        "reflection_correct": 5,
        "decision_correct": 4,
        "q1_wrong": 3,
        "q1_3d_correct_when_q1_wrong": 1,
        "q1_3d_asked_when_q1_wrong": 1,
    }
    assert scores["clarity"] == {"yes": 3, "no": 2, "other": 2}
    assert scores["fallback"] == {"asked": 2, "missing_render": 1}
    assert scores["unprocessed"] == {"count": 2, "ids": ["h", "i"]}
    assert scores["missing_from_predictions"] == {"count": 1, "ids": ["h"]}


def test_per_class_and_confusion(files: tuple[Path, Path]) -> None:
    scores = score_files(*files)
    bottle, cellphone = scores["per_class"]["bottle"], scores["per_class"]["cellphone"]
    assert bottle == {"n": 2, "processed": 1, "description": 1.0, "decision": 0.5}
    assert cellphone == {"n": 1, "processed": 0, "description": None, "decision": 0.0}
    assert scores["per_class"]["bowl"] == {"n": 1, "processed": 1, "description": 0.0, "decision": 1.0}
    q1, final = scores["confusion"]["q1"], scores["confusion"]["final"]
    col = {name: k for k, name in enumerate(q1["columns"])}

    def row(matrix: dict, cls: str) -> dict[str, int]:
        counts = matrix["matrix"][matrix["rows"].index(cls)]
        return {name: counts[k] for name, k in col.items() if counts[k]}

    assert row(q1, "bowl") == {"other": 1}  # lower-case answer matches no class string
    assert row(q1, "can") == {"other": 1}  # no period
    assert row(q1, "knife") == {"bowl": 1}
    assert row(q1, "cellphone") == {}  # not processed: not in the Q1 matrix
    assert row(final, "bottle") == {"bottle": 1, "none": 1}
    assert row(final, "bowl") == {"bowl": 1}
    assert row(final, "knife") == {"none": 1}
    assert sum(map(sum, final["matrix"])) == 9 and sum(map(sum, q1["matrix"])) == 7


def test_writes_scores_and_upstream_predictions_beside_p(files: tuple[Path, Path]) -> None:
    predictions, _ = files
    scores = score_files(*files)
    assert json.loads((predictions.parent / "preds.scores.json").read_text()) == scores
    upstream = json.loads((predictions.parent / "preds.upstream.json").read_text())
    assert upstream == {
        "a": "The object is bottle.",
        "b": "The object is bowl.",
        "c": None,
        "d": "The object is jar.",
        "e": None,
        "f": "The object is camera.",
        "g": None,
        "h": None,
        "i": None,
    }


def test_cli_prints_one_json_object(files: tuple[Path, Path]) -> None:
    predictions, truth = files
    result = CliRunner().invoke(
        main, ["evaluate", "score", "--predictions", str(predictions), "--truth", str(truth)]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["decision"] == pytest.approx(4 / 9)


@pytest.mark.parametrize(
    ("which", "rows", "message"),
    [
        ("preds", [*PREDICTIONS, {"id": "zz", "q1": "The object is can."}], "id zz is not in"),
        ("preds", [*PREDICTIONS, PREDICTIONS[0]], "line 9: duplicate id a"),
        ("preds", [{"id": "a", "q1": 3}], "id a: 'q1' must be a string or null"),
        ("preds", [{"q1": "The object is can."}], "line 1: 'id' must be a non-empty string"),
        ("truth", [{"id": "a", "answer": "The object is bottle."}] * 2, "line 2: duplicate id a"),
        ("truth", [{"id": "a", "answer": "The object is mug."}], "id a: answer 'The object is mug.'"),
        ("truth", [{"id": "a", "answer": "the object is bottle."}], "id a: answer"),
        ("truth", [], "no truth rows"),
    ],
)
def test_bad_input_names_the_file_and_id(
    files: tuple[Path, Path], which: str, rows: list, message: str
) -> None:
    predictions, truth = files
    bad = _write(predictions if which == "preds" else truth, rows)
    with pytest.raises(ScoreInputError, match=message) as info:
        score_files(predictions, truth)
    assert str(bad) in str(info.value)


def test_malformed_line_is_a_one_line_cli_error(files: tuple[Path, Path]) -> None:
    predictions, truth = files
    predictions.write_text('{"id": "a", "q1": \n')
    result = CliRunner().invoke(
        main, ["evaluate", "score", "--predictions", str(predictions), "--truth", str(truth)]
    )
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {predictions}: line 1: malformed JSON")
    assert "Traceback" not in result.output
