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


def test_prediction_errors_are_exact_string_mismatches(tmp_path):
    path = tmp_path / "pred.json"
    path.write_text(json.dumps({"a": "The object is jar.", "b": "The object is Jar.", "c": "jar"}))
    errors, info = occlusion.model_errors(path, np.array(["a", "b", "c"]), np.array(["jar"] * 3))
    assert errors.tolist() == [False, True, True]
    assert info == {"source": "predictions", "covered": 3, "missing": 0, "extra": 0}


def test_predictions_covering_part_of_the_split_are_rejected_with_the_counts(tmp_path):
    # Another split's file: 5 of its 20 ids collide with this split's 00000000..00000019.
    path = tmp_path / "test-split.json"
    path.write_text(json.dumps({f"{i:08d}": "The object is jar." for i in range(15, 35)}))
    ids = np.array([f"{i:08d}" for i in range(20)])
    with pytest.raises(BadSample, match=r"test-split\.json: .*5 of the 20 sample ids") as caught:
        occlusion.model_errors(path, ids, np.array(["jar"] * 20))
    assert "15 of its 20 ids" in str(caught.value) and "--allow-partial-predictions" in str(caught.value)


def test_allowed_partial_predictions_leave_the_other_images_unlabelled(tmp_path):
    path = tmp_path / "pred.json"
    path.write_text(json.dumps({"a": "The object is jar.", "b": "The object is can.", "x": "jar"}))
    errors, info = occlusion.model_errors(
        path, np.array(["a", "b", "c", "d"]), np.array(["jar"] * 4), allow_partial=True
    )
    assert errors.tolist() == [False, True, pd.NA, pd.NA]
    assert info == {"source": "predictions", "covered": 2, "missing": 2, "extra": 1}


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


def test_the_model_errors_grader_refuses_images_without_a_prediction():
    errors = pd.array([True, None, False], dtype="boolean")
    with pytest.raises(ValueError, match="1 of 3 images have no prediction"):
        occlusion.grade(np.array([0.5, 0.6, 0.9]), errors, GraderConfig(name="model-errors"))


def test_calibration_uses_only_the_images_with_a_prediction():
    # Labelled images are wrong below 0.6; the unlabelled ones (all at 0.5) must not count as wrong.
    visibility = np.r_[np.linspace(0.4, 1.0, 200), np.full(200, 0.5)]
    errors = pd.array([*(visibility[:200] < 0.6), *([None] * 200)], dtype="boolean")
    grading = occlusion.grade(visibility, errors, GraderConfig())
    assert grading.threshold_source.startswith("calibrated") and 0.58 < grading.threshold <= 0.62


def test_unclear_rates_skip_images_without_a_label():
    labels = {"model_errors": pd.array([True, None, False, None], dtype="boolean")}
    rows = {row["class"]: row for row in occlusion.unclear_rates(np.array(["jar"] * 3 + ["can"]), labels)}
    assert rows["jar"]["model_errors_unclear_rate"] == 0.5 and rows["all"]["model_errors_unclear_rate"] == 0.5
    assert rows["can"]["model_errors_unclear_rate"] is None


@pytest.mark.parametrize("seed", range(5))
def test_errors_that_visibility_does_not_predict_give_the_methods_rate(seed):
    # Errors independent of visibility: the max-J threshold would fall anywhere (rates 0.04-0.91).
    rng = np.random.default_rng(seed)
    visibility, errors = rng.uniform(0.4, 1.0, 10140), rng.random(10140) < 0.2885
    grading = occlusion.grade(visibility, errors, GraderConfig())
    assert grading.unclear.mean() == pytest.approx(occlusion.METHOD_UNCLEAR_RATE, abs=0.002)
    assert "calibration refused: max Youden J" in grading.threshold_source


def test_the_youden_floor_is_the_constant_on_large_sets_and_the_chance_level_on_small_ones():
    assert occlusion.youden_floor(3000, 7000) == occlusion.MIN_YOUDEN_J
    assert occlusion.youden_floor(15, 35) > 0.4  # J of pure noise reaches ~0.39 on 50 images


def test_held_out_labels_never_depend_on_the_image_s_own_error():
    visibility = np.linspace(0.4, 1.0, 60)
    errors = visibility < 0.6
    labels, _ = occlusion.held_out_labels(visibility, errors, GraderConfig(), seed=0)
    for i in range(len(errors)):
        flipped = errors.copy()
        flipped[i] = ~flipped[i]
        assert occlusion.held_out_labels(visibility, flipped, GraderConfig(), seed=0)[0][i] == labels[i], i


def test_held_out_agreement_of_a_real_signal_is_high_and_counts_every_labelled_image():
    visibility = np.linspace(0.4, 1.0, 400)
    errors = pd.array([*(visibility[:300] < 0.6), *([None] * 100)], dtype="boolean")
    result = occlusion.held_out_agreement(visibility, errors, GraderConfig(), seed=3)
    assert result["samples"] == 300 and result["kappa"] > 0.9
    assert result["held_out"] == "2 folds, seed 3: each fold labelled by a threshold fitted on the rest"
    assert all(s.startswith("calibrated") for s in result["fold_threshold_sources"])


def test_a_configured_threshold_is_compared_on_every_image():
    result = occlusion.held_out_agreement(
        np.array([0.5, 0.7, 0.9]), np.array([True, False, True]), GraderConfig(threshold=0.6), seed=0
    )
    assert (result["samples"], result["agreement"], result["fold_threshold_sources"]) == (
        3,
        0.6667,
        ["config"],
    )


def write_split(tmp_path, visibility, answers):
    ids = [f"{i:08d}" for i in range(len(visibility))]
    pd.DataFrame({"id": ids, "cls": ["jar"] * len(ids), "visibility": visibility}).to_parquet(
        tmp_path / "s.parquet"
    )
    (tmp_path / "p.json").write_text(json.dumps(dict(zip(ids, answers, strict=False))))
    return ["calibrate", "--samples", str(tmp_path / "s.parquet"), "--predictions", str(tmp_path / "p.json")]


def test_occ_occlusion_calibrate_rejects_partial_predictions_in_one_line(tmp_path):
    args = write_split(tmp_path, np.linspace(0.4, 1.0, 80), ["The object is jar."] * 30)
    result = CliRunner().invoke(occlusion.cli, args)
    assert result.exit_code == 1 and "30 of the 80 sample ids" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    allowed = CliRunner().invoke(occlusion.cli, [*args, "--allow-partial-predictions"])
    assert allowed.exit_code == 0, allowed.output


def test_occ_occlusion_calibrate_says_when_it_falls_back_to_the_methods_rate(tmp_path):
    rng = np.random.default_rng(0)
    answers = np.where(rng.random(2000) < 0.3, "The object is can.", "The object is jar.").tolist()
    result = CliRunner().invoke(occlusion.cli, write_split(tmp_path, rng.uniform(0.4, 1.0, 2000), answers))
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.splitlines()[-1])
    assert "calibration refused" in last["threshold_source"]
