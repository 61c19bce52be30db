"""The train flow on a real Prefect server: SFT1 (+ cross-prediction) -> model-errors datasets -> SFT2
-> MPO -> SC -> test Q1 per stage, then the same flow again, which trains nothing; then the evaluate
flow on every stage's model (the protocol with two render folders, the report, the gate).

Run alone: ``.venv/bin/python -m pytest tests/integration/test_train_flow.py`` (about three minutes on
a 2-core CPU: every stage is a subprocess of a few steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from flows.evaluate import EvaluateParams, evaluate_flow
from flows.train import TrainParams, train_flow
from occ_core import obman
from occ_core.datasets import DatasetsConfig
from occ_core.evaluate.infer import InferConfig
from occ_core.occlusion import GraderConfig
from occ_core.render import view_filename
from occ_core.train.config import StageSettings
from occ_core.train.sc import sign_test_p

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.integration, pytest.mark.slow]
FRAMES = 24
QUICK = StageSettings(max_steps=4, save_steps=2, logging_steps=1, device="cpu")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from occ_core.config import get_settings
    from occ_core.datasets import run
    from occ_core.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("flow_obman")
    generate(SynthConfig(out=root, n=FRAMES, seed=5, splits=("train", "test")), processes=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OCC_HOME", str(tmp_path_factory.mktemp("flow_home")))
        get_settings.cache_clear()
        try:
            test_data = Path(run(DatasetsConfig(root=root, split="test"))["out_dir"])
            # Four steps leave a model that gets every image wrong; "unclear" where it is wrong AND the
            # object is hidden keeps both clarity labels (the model-errors grader alone is the demo's).
            params = TrainParams(
                datasets=DatasetsConfig(root=root, split="train", grader=GraderConfig(combine="all")),
                grader="combined",
                test_data=test_data,
                sft1=QUICK,
                sft2=QUICK,
                mpo=QUICK,
                sc=QUICK,
            )
            first, second = train_flow(params), train_flow(params)
            yield first, second, _evaluate(root, test_data, first, tmp_path_factory.mktemp("views"))
        finally:
            get_settings.cache_clear()


def _evaluate(root: Path, test_data: Path, trained: dict, folder: Path) -> dict:
    """The evaluate flow on every stage, the object-only frames standing in for two backends' renders."""
    views = {}
    for backend in ("depth", "oracle"):
        views[backend] = folder / backend
        views[backend].mkdir()
        for ref in obman.list_samples(root, "test"):
            Image.open(ref.rgb_obj_path).save(views[backend] / view_filename(ref.sample_id, "test", 0))
    params = EvaluateParams(
        checkpoints={name: Path(stage["out"]) for name, stage in trained["stages"].items()},
        test_data=test_data,
        views=views,
        infer=InferConfig(fallback="all", max_new_tokens=8, device="cpu"),
        gate="warn",
        examples=2,
    )
    return evaluate_flow(params)


def test_every_stage_trains_in_order_from_the_previous_one(two_runs):
    first, *_ = two_runs
    stages = first["stages"]
    assert list(stages) == ["sft1", "sft2", "mpo", "sc"]
    for stage in stages.values():
        assert stage["final_step"] == QUICK.max_steps and not stage["cached"]
    cards = {name: json.loads((Path(s["out"]) / "occ_card.json").read_text()) for name, s in stages.items()}
    assert cards["sft1"]["init_fingerprint"].startswith("base:tiny:tower ")
    for stage, init in (("sft2", "sft1"), ("mpo", "sft2"), ("sc", "mpo")):
        assert cards[stage]["init_fingerprint"] == cards[init]["fingerprint"]


def test_sft2_and_mpo_train_on_labels_from_sft1s_cross_predicted_errors(two_runs):
    first, *_ = two_runs
    data = Path(first["datasets"])
    summary = json.loads((data / "summary.json").read_text())
    assert summary["grader"] == "combined"
    assert summary["model_errors"] is not None and 0 < summary["unclear"] < FRAMES
    predictions = json.loads(
        (Path(first["stages"]["sft1"]["out"]) / "folds" / "train_predictions.json").read_text()
    )
    assert len(predictions) == FRAMES
    for stage in ("sft2", "mpo"):
        card = json.loads((Path(first["stages"][stage]["out"]) / "occ_card.json").read_text())
        assert Path(card["data"]).parent == data


def test_each_stage_is_scored_on_the_test_split_against_the_baselines(two_runs):
    first, *_ = two_runs
    assert set(first["test_q1"]) == {"sft1", "sft2", "mpo", "sc"}
    for report in first["test_q1"].values():
        assert report["n"] == FRAMES and report["chance"] == 0.125
        assert 0 < report["majority_rate"] <= 1 and 0 <= report["accuracy"] <= 1
    # Self-correction: both attempts of the model before SC (MPO) and after it, with what changed.
    assert set(first["test_two_attempts"]) == {"mpo", "sc"}
    for report in first["test_two_attempts"].values():
        assert report["n"] == FRAMES and 0 <= report["attempt1"] <= 1 and 0 <= report["attempt2"] <= 1
        assert report["fixed"] + report["broken"] <= FRAMES
        assert report["p_value"] == round(sign_test_p(report["fixed"], report["broken"]), 4)


def test_an_unchanged_rerun_trains_nothing(two_runs):
    first, second, _ = two_runs
    for name, stage in second["stages"].items():
        assert stage["out"] == first["stages"][name]["out"] and stage["cached"]
    assert second["test_q1"] == first["test_q1"]
    for name in ("sft1", "sft2", "mpo", "sc"):
        log = Path(first["stages"][name]["out"]) / "train.log"
        assert log.read_text().count('"final_step"') <= 1  # one subprocess run wrote a report


def test_every_stage_is_evaluated_with_each_backend_and_reported(two_runs):
    *_, report = two_runs
    rows = {(row["stage"], row["backend"]): row for row in report["rows"]}
    assert set(rows) == {(s, b) for s in ("sft1", "sft2", "mpo", "sc") for b in ("depth", "oracle")}
    for row in rows.values():
        assert row["n"] == FRAMES
        assert all(row[k] is None or 0 <= row[k] <= 1 for k in ("description", "reflection", "decision"))
    folder = Path(report["dir"])
    assert (folder / "report.md").is_file() and json.loads((folder / "report.json").read_text())["rows"]
    assert report["claims"] and (folder / "confusion_oracle.png").is_file()
    assert report["gate"]["mode"] == "warn" and "MPO decision" in report["gate"]["message"]
    # Q1 and clarity do not depend on the renders: both backends give the same description.
    for stage in ("sft1", "sft2", "mpo", "sc"):
        assert rows[(stage, "depth")]["description"] == rows[(stage, "oracle")]["description"]
