"""The datasets stage on real synthetic ObMan data: the Prefect flow, its cache, bad samples, graders,
renders.

Run: .venv/bin/python -m pytest tests/integration/test_datasets_flow.py -q
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from occ_core import datasets, obman
from occ_core.datasets import DatasetsConfig
from occ_core.occlusion import GraderConfig
from occ_core.render import view_filename
from tests.fixtures.prefect_runs import task_states

pytestmark = pytest.mark.integration

DATASETS = ("sft1", "sft2", "sft2_balanced", "cot", "sc", "pairs")


@pytest.fixture
def train_copy(tmp_path, tiny_obman):
    """A private copy of the tiny train split, free to damage."""
    shutil.copytree(tiny_obman / "train", tmp_path / "obman" / "train")
    return tmp_path / "obman"


def test_flow_writes_every_dataset_and_rebuilds_from_cached_scans(prefect_harness, tiny_obman, occ_home):
    from prefect.artifacts import Artifact

    from flows.datasets import datasets_flow

    cfg = DatasetsConfig(root=tiny_obman, shard_size=2)
    summary = datasets_flow(cfg)
    out = datasets.plan(cfg).out_dir
    assert summary["samples"] == 5 and set(summary["rows"]) == set(DATASETS)
    for name in DATASETS:
        assert {p.name for p in out.glob(f"{name}.*")} == {
            f"{name}.jsonl",
            f"{name}.parquet",
            f"{name}.meta.json",
        }
    assert Artifact.get("datasets-unclear-by-class") is not None
    first = (out / "pairs.jsonl").read_bytes()

    shutil.rmtree(out)
    state = datasets_flow(cfg, return_state=True)
    scans = {name: s for name, s in task_states(state).items() if name.startswith("scan-shard")}
    assert len(scans) == 3 and set(scans.values()) == {"Cached"}
    assert (out / "pairs.jsonl").read_bytes() == first
    assert datasets_flow(cfg)["cached"] is True


def test_new_parameters_write_a_sibling_directory(tiny_obman, occ_home):
    first = datasets.run(DatasetsConfig(root=tiny_obman))
    second = datasets.run(DatasetsConfig(root=tiny_obman, cot_fraction=0.5))
    assert first["key"] != second["key"]
    assert (occ_home / "datasets" / first["key"] / "summary.json").is_file()


def test_bad_samples_are_quarantined_and_the_rest_goes_on(train_copy, occ_home):
    refs = obman.list_samples(train_copy, "train")
    refs[0].segm_path.write_bytes(b"not a png")
    refs[1].rgb_path.unlink()
    summary = datasets.run(DatasetsConfig(root=train_copy))
    assert (summary["samples"], summary["quarantined"]) == (3, 2)
    quarantine = [json.loads(x) for x in (occ_home / "datasets" / summary["key"] / "quarantine.jsonl").open()]
    assert {q["sample_id"]: q["path"] for q in quarantine} == {
        refs[0].sample_id: str(refs[0].segm_path),
        refs[1].sample_id: str(refs[1].rgb_path),
    }
    assert summary["rows"]["sft1"] == 3


def test_renders_give_q1_rows_on_the_view0_image(tmp_path, tiny_obman, occ_home):
    refs = obman.list_samples(tiny_obman, "train")
    (tmp_path / "views").mkdir()
    for ref in refs[:2]:
        Image.new("RGB", (8, 8)).save(
            tmp_path / "views" / view_filename(ref.sample_id, "train", 0), format="PNG"
        )
    summary = datasets.run(DatasetsConfig(root=tiny_obman, renders=tmp_path / "views"))
    assert (summary["rows"]["view3d"], summary["renders_missing"]) == (2, 3)
    rows = [json.loads(x) for x in (occ_home / "datasets" / summary["key"] / "view3d.jsonl").open()]
    assert [r["image"] for r in rows] == [view_filename(r.sample_id, "train", 0) for r in refs[:2]]


def test_model_errors_grader_labels_the_wrong_answers_and_reports_agreement(tmp_path, tiny_obman, occ_home):
    refs = obman.list_samples(tiny_obman, "train")
    classes = {r.sample_id: obman.qa_class(obman.load_meta(r.meta_path)) for r in refs}
    wrong = [refs[0].sample_id, refs[3].sample_id]
    answers = {i: "The object is can." if i in wrong else f"The object is {c}." for i, c in classes.items()}
    (tmp_path / "pred.json").write_text(json.dumps(answers))
    summary = datasets.run(
        DatasetsConfig(
            root=tiny_obman,
            grader=GraderConfig(name="model-errors"),
            predictions=tmp_path / "pred.json",
            min_per_label=1,  # 5 frames: 2 wrong answers are all this fixture has
        )
    )
    table = pd.read_parquet(occ_home / "datasets" / summary["key"] / "samples.parquet")
    assert sorted(table["id"][table["unclear"]]) == sorted(wrong)
    assert summary["agreement"]["samples"] == 5
    assert {"final_unclear_rate", "model_errors_unclear_rate", "visibility_unclear_rate"} <= set(
        summary["unclear_by_class"][-1]
    )
