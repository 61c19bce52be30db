"""Spec of occ_core.occlusion: visibility from masks, model errors, thresholds, graders, agreement.

Run: .venv/bin/python -m pytest tests/unit/test_occlusion.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from occ_core import occlusion
from occ_core.errors import BadSample
from occ_core.occlusion import GraderConfig


def segm(visible: int, hidden: int) -> np.ndarray:
    """A 1-row label image: ``visible`` object pixels seen, ``hidden`` more covered by the hand (22)."""
    width = visible + hidden + 2
    labels = np.zeros((1, width, 3), dtype=np.uint8)
    labels[0, :visible, 0] = 100
    labels[0, visible : visible + hidden, 0] = 22
    labels[0, : visible + hidden, 2] = 100
    return labels


def test_visibility_is_visible_object_pixels_over_the_full_silhouette():
    assert occlusion.visibility_ratio(segm(30, 10)) == pytest.approx(0.75)


def test_visibility_needs_an_object_silhouette():
    with pytest.raises(ValueError, match="channel 2"):
        occlusion.visibility_ratio(np.zeros((4, 4, 3), dtype=np.uint8))


def test_prediction_errors_are_exact_string_mismatches_and_missing_ids(tmp_path):
    path = tmp_path / "pred.json"
    path.write_text(json.dumps({"a": "The object is jar.", "b": "The object is Jar.", "c": "jar"}))
    errors, info = occlusion.model_errors(path, np.array(["a", "b", "c", "d"]), np.array(["jar"] * 4))
    assert errors.tolist() == [False, True, True, True]
    assert info == {"source": "predictions", "covered": 3, "missing": 1}


def test_an_id_list_marks_exactly_the_listed_ids_wrong(tmp_path):
    path = tmp_path / "wrong.json"
    path.write_text('[{"answer": "b"}, {"answer": "zz"}]')
    errors, info = occlusion.model_errors(path, np.array(["a", "b"]), np.array(["jar", "can"]))
    assert errors.tolist() == [False, True] and info["listed"] == 2


def test_a_predictions_file_naming_none_of_the_ids_is_rejected(tmp_path):
    path = tmp_path / "pred.json"
    path.write_text(json.dumps({"x": "The object is jar."}))
    with pytest.raises(BadSample, match="names none of the 2 sample ids"):
        occlusion.model_errors(path, np.array(["a", "b"]), np.array(["jar", "jar"]))


def test_rate_matched_threshold_labels_that_share_unclear():
    visibility = np.linspace(0.4, 1.0, 1001)
    threshold = occlusion.rate_matched_threshold(visibility, 0.2885)
    assert np.mean(visibility < threshold) == pytest.approx(0.2885, abs=0.002)


def test_chosen_threshold_separates_errors_from_right_answers():
    visibility = np.r_[np.linspace(0.4, 0.59, 50), np.linspace(0.61, 1.0, 150)]
    errors = visibility < 0.6
    threshold, table = occlusion.choose_threshold(visibility, errors)
    assert 0.59 < threshold <= 0.61
    best = max(table, key=lambda row: row["youden_j"])
    assert best["youden_j"] == 1.0 and best["balanced_accuracy"] == 1.0


def test_choosing_a_threshold_needs_both_outcomes():
    with pytest.raises(ValueError, match="both"):
        occlusion.choose_threshold(np.array([0.5, 0.6]), np.array([True, True]))


def test_model_errors_grader_needs_errors():
    with pytest.raises(ValueError, match="needs model errors"):
        occlusion.grade(np.array([0.5]), None, GraderConfig(name="model-errors"))


def test_configured_threshold_wins_over_calibration():
    grading = occlusion.grade(np.array([0.5, 0.7]), np.array([False, True]), GraderConfig(threshold=0.6))
    assert grading.unclear.tolist() == [True, False] and grading.threshold_source == "config"


def test_threshold_is_calibrated_on_model_errors_when_they_exist():
    visibility = np.r_[np.full(10, 0.45), np.full(30, 0.9)]
    grading = occlusion.grade(visibility, visibility < 0.5, GraderConfig())
    assert grading.unclear.sum() == 10 and grading.threshold_source.startswith("calibrated")


def test_threshold_reproduces_the_methods_rate_without_model_errors():
    grading = occlusion.grade(np.linspace(0.4, 1.0, 1001), None, GraderConfig())
    assert grading.unclear.mean() == pytest.approx(occlusion.METHOD_UNCLEAR_RATE, abs=0.002)
    assert grading.model_error is None


@pytest.mark.parametrize(
    ("combine", "expected"), [("any", [True, True, True, False]), ("all", [True, False, False, False])]
)
def test_combined_grader_joins_both_labels(combine, expected):
    visibility, errors = np.array([0.5, 0.5, 0.9, 0.9]), np.array([True, False, True, False])
    grading = occlusion.grade(
        visibility, errors, GraderConfig(name="combined", threshold=0.6, combine=combine)
    )
    assert grading.unclear.tolist() == expected


def test_identical_labels_agree_fully_and_opposite_ones_not_at_all():
    labels = np.array([True, False, True, False])
    assert occlusion.agreement(labels, labels)["kappa"] == 1.0
    opposite = occlusion.agreement(labels, ~labels)
    assert (opposite["agreement"], opposite["only_first"], opposite["only_second"]) == (0.0, 2, 2)


def test_unclear_rates_are_given_per_class_and_overall():
    rows = occlusion.unclear_rates(
        np.array(["jar", "jar", "can", "can"]), {"final": np.array([True, False, True, True])}
    )
    by_class = {row["class"]: row for row in rows}
    assert by_class["jar"]["final_unclear_rate"] == 0.5 and by_class["can"]["final_unclear_rate"] == 1.0
    assert by_class["all"]["samples"] == 4 and by_class["knife"]["final_unclear_rate"] is None


def test_occ_occlusion_calibrate_prints_the_best_threshold(tmp_path):
    visibility = np.r_[np.linspace(0.4, 0.55, 20), np.linspace(0.65, 1.0, 60)]
    ids = [f"{i:08d}" for i in range(80)]
    pd.DataFrame({"id": ids, "cls": ["jar"] * 80, "visibility": visibility}).to_parquet(
        tmp_path / "s.parquet"
    )
    answers = np.where(visibility < 0.6, "The object is can.", "The object is jar.")
    predictions = dict(zip(ids, answers.tolist(), strict=True))
    (tmp_path / "p.json").write_text(json.dumps(predictions))
    result = CliRunner().invoke(
        occlusion.cli,
        ["calibrate", "--samples", str(tmp_path / "s.parquet"), "--predictions", str(tmp_path / "p.json")],
    )
    assert result.exit_code == 0, result.output
    assert 0.55 < json.loads(result.output.splitlines()[-1])["threshold"] <= 0.65
