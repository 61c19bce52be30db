"""The evaluation report: files, rows, PNGs, the promotion gate and the claims, on hand-made scores.

.venv/bin/python -m pytest tests/unit/evaluate/test_report.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from occ_core.evaluate.report import (
    PAPER_ROWS,
    PromotionError,
    ReportInputError,
    build_report,
    claims,
    promotion_gate,
    render_markdown,
)
from occ_core.evaluate.score import score_files
from occ_core.fsio import write_jsonl_atomic
from occ_core.render import view_filename

TRUTH = {"a": "bottle", "b": "bowl", "c": "can", "d": "jar"}


def scores(description: float, reflection: float, decision: float, n: int = 4) -> dict[str, Any]:
    """A scores dict with only what a report row reads (no predictions file behind it)."""
    return {
        "description": description,
        "reflection": reflection,
        "decision": decision,
        "three_d_plus": None,
        "n": n,
        "processed": n,
    }


def scored_run(tmp_path: Path, name: str, q1_3d: str | None) -> dict[str, Any]:
    """Real files scored by score_files: a wrong Q1 with 'No.' on b, its render answer ``q1_3d``."""
    out = tmp_path / name
    write_jsonl_atomic(
        out / "truth.jsonl", [{"id": i, "answer": f"The object is {c}."} for i, c in TRUTH.items()]
    )
    rows = [
        {"id": "a", "q1": "The object is bottle.", "clarity": "Yes.", "q1_3d": None},
        {"id": "b", "q1": "The object is can.", "clarity": "No.", "q1_3d": q1_3d},
        {"id": "c", "q1": "The object is can.", "clarity": "Yes.", "q1_3d": None},
        {"id": "d", "q1": "The object is bowl.", "clarity": "No.", "q1_3d": "The object is jar."},
    ]
    write_jsonl_atomic(out / "predictions.jsonl", rows)
    return score_files(
        out / "predictions.jsonl", out / "truth.jsonl", {"views": str(tmp_path / "views"), "split": "test"}
    )


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """An input image per test id, and a view-0 render for all but d."""
    views = tmp_path / "views"
    views.mkdir()
    paths = {}
    for k, sample_id in enumerate(TRUTH):
        paths[sample_id] = tmp_path / f"{sample_id}.jpg"
        Image.new("RGB", (64, 48), (40 * k, 90, 160)).save(paths[sample_id])
        if sample_id != "d":
            Image.new("RGB", (32, 32), (200, 40 * k, 60)).save(views / view_filename(sample_id, "test", 0))
    return paths


def test_report_files_rows_and_pngs(tmp_path: Path, images: dict[str, Path]) -> None:
    results = {
        "sft2": {"oracle": scored_run(tmp_path, "sft2", None)},
        "mpo": {
            "oracle": scored_run(tmp_path, "mpo", "The object is bowl."),
            "depth": scores(0.5, 0.5, 0.25),
        },
    }
    out = tmp_path / "report"
    report = build_report(results, out, examples=images, n_examples=3)

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert [(r["stage"], r["backend"]) for r in report["rows"]] == [
        ("sft2", "oracle"),
        ("mpo", "depth"),
        ("mpo", "oracle"),
    ]
    sft2, mpo_oracle = report["rows"][0], report["rows"][2]
    assert (sft2["description"], sft2["reflection"], sft2["decision"], sft2["n"]) == (0.5, 1.0, 0.75, 4)
    assert mpo_oracle["decision"] == 1.0 and mpo_oracle["three_d_plus"] == 1.0
    assert report["paper"]["rows"] == list(PAPER_ROWS)
    assert report["scores"]["mpo"]["depth"]["decision"] == 0.25

    markdown = (out / "report.md").read_text()
    assert "| sft2 | oracle | 0.5000 | 1.0000 | 0.7500 | 0.5000 | 4 |" in markdown
    assert "| mpo | depth | 0.5000 | 0.5000 | 0.2500 | – | 4 |" in markdown
    assert "| 10K | OCC-MLLM-CoT 1B | 0.6512 | 0.6843 | 0.6625 |" in markdown
    assert "| 100K | Base 8B | – | – | 0.6412 |" in markdown
    assert markdown.index("| mpo | oracle |") < markdown.index("not comparable") < markdown.index("| 10K |")
    for name in (
        "per_class_oracle.png",
        "confusion_oracle.png",
        "examples_oracle.png",
        "per_class_depth.png",
    ):
        assert f"]({name})" in markdown
        assert (out / name).is_file()
    # The depth scores have no predictions file behind them: no strip, nothing referenced.
    assert report["images"]["examples"] == {"oracle": "examples_oracle.png"}

    sizes = {name: Image.open(out / name).size for name in report["images"]["confusion"].values()}
    # One confusion panel per stage: oracle has two stages, depth one.
    assert sizes["confusion_oracle.png"][0] > sizes["confusion_depth.png"][0]
    strip = Image.open(out / "examples_oracle.png")
    width, height = strip.size
    # Three examples of (input + render) side by side, text under the tiles: wide, and taller than a tile.
    assert width > 3 * 2 * 160 and 160 < height < width
    assert Image.open(out / "per_class_oracle.png").size[0] > Image.open(out / "per_class_oracle.png").size[1]


def test_strip_grows_with_examples(tmp_path: Path, images: dict[str, Path]) -> None:
    results = {"sc": {"oracle": scored_run(tmp_path, "sc", None)}}
    two = build_report(results, tmp_path / "two", examples=images, n_examples=2)
    four = build_report(results, tmp_path / "four", examples=images, n_examples=4)
    w2, h2 = Image.open(tmp_path / "two" / two["images"]["examples"]["oracle"]).size
    w4, h4 = Image.open(tmp_path / "four" / four["images"]["examples"]["oracle"]).size
    assert w4 > w2 and h4 == h2


def test_embedded_markdown_has_data_uris(tmp_path: Path) -> None:
    report = build_report({"base": {"oracle": scores(0.25, 0.5, 0.25)}}, tmp_path)
    embedded = render_markdown(report, embed_dir=tmp_path)
    assert "](data:image/png;base64," in embedded and "](per_class_oracle.png)" not in embedded


def test_missing_stages_and_backends(tmp_path: Path) -> None:
    results = {"sft1": {"moho": scores(0.25, 0.5, 0.5)}, "mpo": {}}
    report = build_report(results, tmp_path)
    assert report["stages"] == ["sft1"] and report["backends"] == ["moho"]
    assert [r["stage"] for r in report["rows"]] == ["sft1"]
    assert report["images"]["examples"] == {}
    assert any("no stage was scored with the oracle backend" in c for c in report["claims"])
    assert any("SFT2 and MPO were not both scored" in c for c in report["claims"])


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({"cot": {"oracle": scores(0, 0, 0)}}, "unknown stage 'cot'"),
        ({"mpo": {"mesh": scores(0, 0, 0)}}, "mpo: unknown backend 'mesh'"),
        ({"mpo": {"oracle": {"decision": 0.5}}}, "mpo/oracle: scores lack description"),
        ({}, "no scores to report"),
    ],
)
def test_bad_results(tmp_path: Path, results: dict[str, Any], message: str) -> None:
    with pytest.raises(ReportInputError, match=message):
        build_report(results, tmp_path)


BETTER = {"sft2": {"oracle": scores(0.5, 0.5, 0.5)}, "mpo": {"oracle": scores(0.5, 0.6, 0.625)}}
WORSE = {"sft2": {"oracle": scores(0.5, 0.6, 0.625)}, "mpo": {"oracle": scores(0.5, 0.5, 0.625)}}


def test_gate_fail_mode() -> None:
    assert promotion_gate(BETTER, "oracle", "fail").passed is True
    # A tie does not beat SFT2.
    with pytest.raises(PromotionError, match=r"MPO decision 0\.6250 does not beat SFT2 decision 0\.6250"):
        promotion_gate(WORSE, "oracle", "fail")
    with pytest.raises(PromotionError, match="no decision score for sft2 and mpo"):
        promotion_gate(BETTER, "depth", "fail")


def test_gate_warn_and_off_modes() -> None:
    warned = promotion_gate(WORSE, "oracle", "warn")
    assert warned.passed is False and "does not beat" in warned.message
    assert (warned.sft2, warned.mpo) == (0.625, 0.625)
    missing = promotion_gate({"sft2": BETTER["sft2"]}, "oracle", "warn")
    assert missing.passed is None and "no decision score for mpo" in missing.message
    off = promotion_gate(WORSE, "oracle", "off")
    assert off.passed is None and "off" in off.message


def test_claims_true_and_false() -> None:
    held = claims(BETTER)
    result = "the paper's result that a hand-free fallback gives decision >= description holds here."
    assert held == [
        f"sft2, oracle render: decision 0.5000 >= description 0.5000; {result}",
        f"mpo, oracle render: decision 0.6250 >= description 0.5000; {result}",
        "Reflection (oracle run): MPO 0.6000 >= SFT2 0.5000; the paper's result that MPO's reflection is at "
        "least SFT2's holds here.",
    ]
    failed = claims({"sft2": {"oracle": scores(0.75, 0.6, 0.5)}, "mpo": {"oracle": scores(0.5, 0.5, 0.25)}})
    assert failed[0].startswith("sft2, oracle render: decision 0.5000 < description 0.7500")
    assert failed[0].endswith("does not hold here.")
    assert "MPO 0.5000 < SFT2 0.6000" in failed[2] and failed[2].endswith("does not hold here.")
