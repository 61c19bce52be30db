"""Spec of occ_core.preference: seeded balancing (plain and stratified) and MPO preference pairs.

Run: .venv/bin/python -m pytest tests/unit/test_preference.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from occ_core import cot, preference
from occ_core.cli import main
from occ_core.cot import Prompts
from occ_core.jsonl import dumps
from occ_core.preference import BalanceConfig


def labelled(classes: list[str], unclear: list[bool]):
    ids = [f"{i:08d}" for i in range(len(classes))]
    return cot.sample_table(ids, [f"{i}.jpg" for i in ids], classes, unclear)


def sft2_line(sample_id: str, cls: str, answer: str | None) -> str:
    turns = [
        {"from": "human", "value": "What's the object in the hand?\n<image>"},
        {"from": "gpt", "value": f"The object is {cls}."},
    ]
    if answer is not None:
        turns += [{"from": "human", "value": Prompts().q6}, {"from": "gpt", "value": answer}]
    return dumps({"id": sample_id, "image": f"{sample_id}.jpg", "conversations": turns})


@pytest.fixture
def skewed():
    """70 clear jars, 20 unclear jars, 9 clear remotes, 1 unclear remote."""
    return labelled(["jar"] * 90 + ["remote"] * 10, [False] * 70 + [True] * 20 + [False] * 9 + [True])


@pytest.mark.parametrize(
    ("counts", "n"), [([70, 9], 21), ([1000, 1, 1, 1], 10), ([5, 5], 10), ([3, 0, 7], 5)]
)
def test_allocate_draws_n_in_proportion_within_each_group(counts, n):
    alloc = preference.allocate(np.array(counts), n)
    assert alloc.sum() == n and (alloc <= counts).all()


def test_allocate_keeps_one_row_of_every_non_empty_group_when_it_can():
    assert preference.allocate(np.array([1000, 1, 1, 1]), 10).tolist() == [7, 1, 1, 1]


def test_balancing_keeps_every_minority_row_and_as_many_of_the_majority(skewed):
    balanced = preference.balance_labels(skewed, BalanceConfig(seed=3))
    assert balanced["unclear"].sum() == 21 and (~balanced["unclear"]).sum() == 21
    assert set(skewed["id"][skewed["unclear"]]) <= set(balanced["id"])


def test_balancing_is_reproducible_for_a_seed_and_moves_with_it(skewed):
    ids = [preference.balance_labels(skewed, BalanceConfig(seed=s))["id"].tolist() for s in (5, 5, 6)]
    assert ids[0] == ids[1] != ids[2]


def test_balanced_rows_are_shuffled(skewed):
    labels = preference.balance_labels(skewed)["unclear"].tolist()
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)


def test_stratified_balancing_keeps_a_rare_classes_majority_rows(skewed):
    # 9 of 79 clear rows are remotes; 21 are kept, so stratified keeps round(21*9/79) = 2 of them.
    for seed in range(20):
        balanced = preference.balance_labels(skewed, BalanceConfig(seed=seed, stratify=True))
        clear_remotes = ((balanced["cls"] == "remote") & ~balanced["unclear"]).sum()
        assert clear_remotes == 2


def test_balance_stats_count_labels_per_class_before_and_after(skewed):
    stats = preference.balance_stats(skewed, preference.balance_labels(skewed))
    remote = next(r for r in stats if r["class"] == "remote")
    assert (remote["yes_before"], remote["no_before"], remote["no_after"]) == (9, 1, 1)
    assert stats[-1] == {"class": "total", "yes_before": 79, "no_before": 21, "yes_after": 21, "no_after": 21}


def test_pair_lines_are_the_upstream_dpo_rows():
    lines = list(preference.encode_pairs(labelled(["jar", "can"], [True, False]), Prompts()))
    assert lines == [
        '{"image": "00000000.jpg", "question": "Is it clear to identify the object in the hand?\\n", '
        '"chosen": "No.", "rejected": "Yes."}',
        '{"image": "00000001.jpg", "question": "Is it clear to identify the object in the hand?\\n", '
        '"chosen": "Yes.", "rejected": "No."}',
    ]


def test_trl_pairs_hold_prompt_chosen_and_rejected_messages(tmp_path):
    row = preference.pairs_trl_table(labelled(["jar"], [True]), Prompts(), tmp_path).to_pylist()[0]
    assert row["prompt"] == [{"role": "user", "content": Prompts().q6}]
    assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == ("No.", "Yes.")
    assert row["images"] == [str(tmp_path / "00000000.jpg")]


def test_rows_without_a_clarity_turn_are_quarantined_not_paired(tmp_path):
    source = tmp_path / "sft2.jsonl"
    source.write_text(
        "\n".join(
            [
                sft2_line("00000001", "jar", "Yes."),
                sft2_line("00000002", "can", None),
                sft2_line("00000003", "jar", "No."),
            ]
        )
        + "\n"
    )
    report = preference.build(source, tmp_path / "pairs.jsonl", BalanceConfig(balance=False))
    assert report.ok == 2 and [q.sample_id for q in report.quarantined] == ["00000002"]
    assert [json.loads(x)["chosen"] for x in (tmp_path / "pairs.jsonl").read_text().splitlines()] == [
        "Yes.",
        "No.",
    ]


def test_occ_pairs_build_balances_by_default(tmp_path):
    source = tmp_path / "sft2.jsonl"
    source.write_text(
        "".join(sft2_line(f"{i:08d}", "jar", "No." if i < 3 else "Yes.") + "\n" for i in range(10))
    )
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(
        main, ["pairs", "build", "--source", str(source), "--out", str(out), "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    chosen = [json.loads(x)["chosen"] for x in out.read_text().splitlines()]
    assert sorted(chosen) == ["No."] * 3 + ["Yes."] * 3
    assert json.loads((tmp_path / "pairs.meta.json").read_text())["pairs"]["length"] == 6


def test_pairs_from_one_clarity_answer_only_are_an_error_with_the_counts(tmp_path):
    source = tmp_path / "sft2.jsonl"
    source.write_text("".join(sft2_line(f"{i:08d}", "jar", "Yes.") + "\n" for i in range(4)))
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(main, ["pairs", "build", "--source", str(source), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "one clarity answer only: 4 'Yes.', 0 'No.' (4 source rows, 0 quarantined)" in result.output
    assert not out.exists()
    result = CliRunner().invoke(
        main, ["pairs", "build", "--source", str(source), "--out", str(out), "--allow-degenerate"]
    )
    assert result.exit_code == 0, result.output
    assert out.read_text() == ""


def test_pairs_from_rows_all_quarantined_are_an_error(tmp_path):
    source = tmp_path / "sft2.jsonl"
    source.write_text(sft2_line("00000001", "jar", None) + "\n")
    with pytest.raises(cot.DegenerateOutput, match="no rows"):
        preference.build(source, tmp_path / "pairs.jsonl")


def test_a_negative_seed_is_a_usage_error_naming_it(tmp_path):
    source = tmp_path / "sft2.jsonl"
    source.write_text(
        sft2_line("00000001", "jar", "No.") + "\n" + sft2_line("00000002", "jar", "Yes.") + "\n"
    )
    result = CliRunner().invoke(
        main, ["pairs", "build", "--source", str(source), "--out", str(tmp_path / "p.jsonl"), "--seed", "-1"]
    )
    assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output
