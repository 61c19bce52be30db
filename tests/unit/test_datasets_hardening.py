"""The datasets stage on hand-written ObMan samples: what it admits, what it refuses, what its key covers.

Each sample is written here (a valid meta pickle, a segm PNG, an rgb JPEG), so no renderer runs.

Run: .venv/bin/python -m pytest tests/unit/test_datasets_hardening.py -q
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import ValidationError

from occ_core import datasets, obman
from occ_core.cli import main
from occ_core.datasets import DatasetsConfig
from occ_core.errors import StageError
from tests.fixtures.obman import valid_meta

N_SAMPLES = 8


def write_sample(root: Path, split: str, sample_id: str, visible_rows: int) -> obman.SampleRef:
    """One frame of class bottle: a 16-row object silhouette of which ``visible_rows`` rows show."""
    ref = obman.SampleRef(root, split, sample_id)
    for path in (ref.rgb_path, ref.segm_path, ref.meta_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    ref.meta_path.write_bytes(pickle.dumps(valid_meta(), protocol=2))
    # PIL writes RGB; the readers flip to OpenCV order, so R is the object-only and B the full-scene label.
    segm = np.zeros((32, 32, 3), np.uint8)
    segm[8:24, 8:24, 0] = obman.OBJECT_LABEL
    segm[8 : 8 + visible_rows, 8:24, 2] = obman.OBJECT_LABEL
    Image.fromarray(segm).save(ref.segm_path)
    Image.new("RGB", (32, 32), (120, 80, 40)).save(ref.rgb_path, quality=90)
    ref.depth_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(ref.depth_path)
    return ref


def write_split(root: Path, split: str = "train", same_visibility: bool = False) -> list[obman.SampleRef]:
    return [
        write_sample(root, split, f"{i * 3:08d}", 16 if same_visibility else 2 + i) for i in range(N_SAMPLES)
    ]


@pytest.fixture
def split(tmp_path) -> list[obman.SampleRef]:
    return write_split(tmp_path / "obman")


def out_dir(summary: dict) -> Path:
    return Path(summary["out_dir"])


def images_of(path: Path) -> set[str]:
    return {json.loads(line)["image"] for line in path.read_text().splitlines()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


DAMAGE = {
    "zero-bytes": lambda p: p.write_bytes(b""),
    "truncated": _truncate,
    "random-bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(2000)),
}


# --- case 3: every admitted image decodes ---------------------------------------------------------


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_undecodable_rgb_is_quarantined_and_in_no_dataset(split, occ_home, damage):
    bad = split[2]
    DAMAGE[damage](bad.rgb_path)
    summary = datasets.run(DatasetsConfig(root=split[0].root))
    assert (summary["samples"], summary["quarantined"]) == (N_SAMPLES - 1, 1)
    quarantine = [json.loads(x) for x in (out_dir(summary) / "quarantine.jsonl").open()]
    assert [(q["sample_id"], q["path"]) for q in quarantine] == [(bad.sample_id, str(bad.rgb_path))]
    for name in ("sft1", "sft2", "cot", "sc", "pairs"):
        assert bad.rgb_path.name not in images_of(out_dir(summary) / f"{name}.jsonl"), name


# --- case 4: samples are the union of the sample folders ---------------------------------------------


def test_a_sample_without_its_meta_pickle_is_quarantined_and_counted(split, occ_home):
    split[1].meta_path.unlink()
    split[4].segm_path.unlink()
    summary = datasets.run(DatasetsConfig(root=split[0].root))
    assert (summary["samples"], summary["quarantined"]) == (N_SAMPLES - 2, 2)
    quarantine = {q["sample_id"]: q for q in map(json.loads, (out_dir(summary) / "quarantine.jsonl").open())}
    assert quarantine[split[1].sample_id]["path"] == str(split[1].meta_path)
    assert quarantine[split[4].sample_id]["path"] == str(split[4].segm_path)
    assert "missing" in quarantine[split[1].sample_id]["reason"]


def test_a_split_with_images_but_no_meta_folder_is_quarantined_not_empty(split, occ_home):
    shutil.rmtree(split[0].meta_path.parent)
    with pytest.raises(StageError, match=f"every sample of the split was quarantined.*{N_SAMPLES}"):
        datasets.run(DatasetsConfig(root=split[0].root))


# --- case 5: degenerate outputs are errors unless allowed -------------------------------------------


def test_one_clarity_label_only_is_an_error_with_the_counts(tmp_path, occ_home):
    root = tmp_path / "obman"
    write_split(root, same_visibility=True)
    with pytest.raises(StageError, match=rf"one clarity answer only: {N_SAMPLES} 'Yes\.', 0 'No\.'"):
        datasets.run(DatasetsConfig(root=root))
    summary = datasets.run(DatasetsConfig(root=root, allow_degenerate=True))
    assert summary["rows"]["pairs"] == 0 and summary["rows"]["sft2"] == N_SAMPLES


def test_a_model_with_too_few_errors_to_balance_is_an_error_naming_the_counts(tmp_path, occ_home):
    from occ_core.occlusion import GraderConfig

    refs = write_split(tmp_path / "obman")
    # The model got every image right but one: one 'No.' against seven 'Yes.' cannot make a balanced set.
    answers = {ref.sample_id: "The object is bottle." for ref in refs}
    answers[refs[0].sample_id] = "The object is jar."
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(answers))
    grader = GraderConfig(name="model-errors")
    cfg = DatasetsConfig(root=refs[0].root, grader=grader, predictions=predictions)
    with pytest.raises(StageError, match=r"too few 'No\.' to balance: 7 'Yes\.', 1 'No\.' \(at least 4"):
        datasets.run(cfg)
    assert datasets.run(cfg.model_copy(update={"min_per_label": 1}))["rows"]["sft2_balanced"] == 2


def test_occ_datasets_degenerate_exits_1_with_the_counts_and_the_flag(tmp_path, occ_home):
    root = tmp_path / "obman"
    write_split(root, same_visibility=True)
    result = CliRunner().invoke(main, ["datasets", "--root", str(root)])
    assert result.exit_code == 1 and "--allow-degenerate" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["datasets", "--root", str(root), "--allow-degenerate"])
    assert result.exit_code == 0, result.output


# --- case 8: the stage key covers the root the outputs name -------------------------------------------


def test_a_copy_of_the_split_under_another_root_is_built_again_and_names_that_root(split, tmp_path, occ_home):
    first = datasets.run(DatasetsConfig(root=split[0].root))
    second_root = tmp_path / "copy"
    shutil.copytree(split[0].root, second_root)  # copytree keeps the files' modification times
    second = datasets.run(DatasetsConfig(root=second_root))
    assert second["cached"] is False and second["key"] != first["key"]
    meta = json.loads((out_dir(second) / "sft1.meta.json").read_text())
    assert meta["sft1"]["root"] == str((second_root / "train" / "rgb").resolve())


def test_the_same_root_spelled_relatively_is_the_same_key(split, occ_home, monkeypatch):
    root = split[0].root
    monkeypatch.chdir(root.parent)
    assert (
        datasets.plan(DatasetsConfig(root=Path(root.name))).key
        == datasets.plan(DatasetsConfig(root=root)).key
    )


# --- cases 10 and 2: options are checked where they are given ---------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--seed", "-1"], "--seed"),
        (["--split", "../other/train"], "--split"),
        (["--cot-fraction", "2"], "--cot-fraction"),
    ],
)
def test_a_bad_option_is_a_one_line_usage_error_naming_it(split, occ_home, args, option):
    result = CliRunner().invoke(main, ["datasets", "--root", str(split[0].root), *args])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()[-1]) > 0


def test_the_split_is_a_split_name_in_the_config(tmp_path):
    with pytest.raises(ValidationError, match="split must be a name"):
        DatasetsConfig(root=tmp_path, split="../r30/test")
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        DatasetsConfig(root=tmp_path, seed=-1)


# --- the render stage admits its inputs by the same validator --------------------------------------------


def test_reconstruct_quarantines_an_rgb_the_datasets_stage_refuses(split, tmp_path):
    from moho_bridge.pipeline import ReconstructParams, reconstruct

    root = split[0].root
    mesh = root / "shapenet" / "02876657" / "abc123" / "models" / "model_normalized.obj"  # valid_meta's
    mesh.parent.mkdir(parents=True)
    mesh.write_text("v 0 0 0\nv 0.1 0 0\nv 0 0.1 0\nv 0 0 0.1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n")
    DAMAGE["truncated"](split[0].rgb_path)
    split[1].depth_path.unlink()
    report, results = reconstruct(
        split[:3], ReconstructParams(root=root, split="train", backend="oracle"), tmp_path / "m"
    )
    assert report.ok == 1
    assert {(q.sample_id, q.path) for q in report.quarantined} == {
        (split[0].sample_id, str(split[0].rgb_path)),
        (split[1].sample_id, str(split[1].depth_path)),
    }
    assert sorted(r.sample_id for r in results) == [r.sample_id for r in split[:3]]
