"""``occ evaluate run`` end to end on a tiny model, the synthetic test split and hand-written renders.

    .venv/bin/python -m pytest tests/integration/test_evaluate_run.py -q

The model is the tiny preset built from its config (untrained language model: its answers are
whatever it says; the protocol and the files are under test, not the scores). Renders are the
frames' object-only images saved under MOHO's view-0 name; ``--fallback all`` asks Q1 on them for
every image, so the render pass runs whatever the model says about clarity.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from occ_core import obman
from occ_core.cli import main
from occ_core.render import view_filename

pytestmark = [pytest.mark.integration]
QUICK = [
    "--fallback",
    "all",
    "--shard-size",
    "2",
    "--batch-size",
    "4",
    "--max-new-tokens",
    "6",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from occ_core.train.tiny import VISION_ASSET, build_tiny

    model, processor = build_tiny(VISION_ASSET, seed=0)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture
def views(tiny_obman: Path, tmp_path: Path) -> Path:
    """View-0 renders of every test frame but the last (its render is missing)."""
    folder = tmp_path / "views"
    folder.mkdir()
    for ref in obman.list_samples(tiny_obman, "test")[:-1]:
        Image.open(ref.rgb_obj_path).convert("RGB").save(folder / view_filename(ref.sample_id, "test", 0))
    return folder


def _run(*args: str | Path) -> tuple[int, str]:
    """Exit code, and stdout when it succeeded (one JSON line), else the error output."""
    result = CliRunner().invoke(main, ["evaluate", "run", *map(str, args)])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def _one_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_run_scores_every_image_and_resumes_only_a_missing_shard(tiny_model, tiny_obman, views, tmp_path):
    out = tmp_path / "eval"
    args = [
        "--checkpoint",
        tiny_model,
        "--root",
        tiny_obman,
        "--split",
        "test",
        "--views",
        views,
        "--out",
        out,
    ]
    code, output = _run(*args, *QUICK)
    assert code == 0, output
    scores = _one_json(output)
    ids = [ref.sample_id for ref in obman.list_samples(tiny_obman, "test")]
    assert (scores["n"], scores["processed"]) == (len(ids), len(ids))
    assert {"description", "reflection", "decision", "three_d_plus"} <= set(scores)
    assert scores["shards"] == {"computed": [0, 1, 2], "reused": []}
    assert scores["warnings"]["renders_absent_from_views"] == {"count": 1, "ids": [ids[-1]]}
    assert scores["warnings"]["fallback_without_render"] == {"count": 1, "ids": [ids[-1]]}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ids
    assert all(isinstance(r["q1"], str) and isinstance(r["clarity"], str) for r in rows)
    assert [r["q1_3d"] is None for r in rows] == [False] * (len(ids) - 1) + [True]
    truth = [json.loads(line) for line in (out / "truth.jsonl").read_text().splitlines()]
    assert all(t["answer"].startswith("The object is ") for t in truth)
    assert json.loads((out / "predictions.scores.json").read_text()) == scores
    assert set(json.loads((out / "predictions.upstream.json").read_text())) == set(ids)

    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.jsonl")}
    (out / "shards" / "shard-00001.jsonl").unlink()
    code, output = _run(*args, *QUICK)
    assert code == 0, output
    again = _one_json(output)
    assert again["shards"] == {"computed": [1], "reused": [0, 2]}
    for name in ("shard-00000.jsonl", "shard-00002.jsonl"):
        assert (out / "shards" / name).stat().st_mtime_ns == kept[name]
    assert [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()] == rows

    code, output = _run(*args, *QUICK[:-2], "--clarity-prompt", "train")
    assert code == 1 and "holds shards of another evaluation (differs in clarity_prompt)" in output


def test_a_directory_that_is_not_a_model_is_named(tiny_obman, views, tmp_path):
    code, output = _run(
        "--checkpoint", tmp_path, "--root", tiny_obman, "--views", views, "--out", tmp_path / "o"
    )
    assert code == 1
    assert output.strip() == f"Error: {tmp_path}: not a model directory (no config.json)"


def test_a_views_directory_without_any_matching_render_is_named(tiny_model, tiny_obman, views, tmp_path):
    for png in views.iterdir():
        shutil.move(png, views / png.name.replace("_test_", "_val_"))
    first = obman.list_samples(tiny_obman, "test")[0].sample_id
    code, output = _run(
        "--checkpoint", tiny_model, "--root", tiny_obman, "--views", views, "--out", tmp_path / "o"
    )
    assert code == 1
    assert f"{views}: no view-0 render for any of the" in output
    assert view_filename(first, "test", 0) in output


def test_root_and_data_are_exclusive(tiny_model, tiny_obman, views):
    code, output = _run("--checkpoint", tiny_model, "--views", views)
    assert code == 2 and "exactly one of --root and --data" in output
