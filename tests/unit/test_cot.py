"""Spec of occ_core.cot: the question registry, reading Q1 rows, and the SFT1/SFT2/CoT/SC builders.

Run: .venv/bin/python -m pytest tests/unit/test_cot.py -q
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from occ_core import cot
from occ_core.cli import main
from occ_core.cot import CotConfig, Prompts
from occ_core.errors import BadSample
from occ_core.jsonl import dumps


def q1_line(sample_id: str, cls: str) -> str:
    return dumps(
        {
            "id": sample_id,
            "image": f"{sample_id}.jpg",
            "conversations": [
                {"from": "human", "value": "What's the object in the hand?\n<image>"},
                {"from": "gpt", "value": f"The object is {cls}."},
            ],
        }
    )


@pytest.fixture
def q1_file(tmp_path):
    path = tmp_path / "q1.jsonl"
    path.write_text(
        "".join(q1_line(f"{i:08d}", c) + "\n" for i, c in enumerate(["jar", "bowl", "can", "knife"]))
    )
    return path


def table_of(n: int, unclear_every: int = 4):
    ids = [f"{i:08d}" for i in range(n)]
    return cot.sample_table(
        ids, [f"{i}.jpg" for i in ids], ["jar"] * n, [i % unclear_every == 0 for i in range(n)]
    )


def test_registry_holds_the_methods_exact_strings():
    prompts = Prompts()
    assert prompts.question("Q1") == "What's the object in the hand?"
    assert prompts.question("Q6") == "Is it clear to identify the object in the hand?"
    assert prompts.question("Q0") == "Please analyze this image step by step."
    assert prompts.question("SC") == "Please check again what's the object in the hand?"
    assert "based on orignal features" in prompts.cot_answer


def test_unset_question_slots_say_their_text_is_unknown():
    with pytest.raises(KeyError, match="Q3 has no text"):
        Prompts().question("Q3")
    assert Prompts(q3="Where is the hand?").question("Q3") == "Where is the hand?"


def test_image_token_follows_the_text_by_default_and_can_lead():
    assert Prompts().with_image("Q?") == "Q?\n<image>"
    assert Prompts(image_after_text=False).with_image("Q?") == "<image>\nQ?"


def test_pair_question_ends_with_a_newline_unless_disabled():
    assert Prompts().pair_question() == "Is it clear to identify the object in the hand?\n"
    assert (
        Prompts(pair_question_newline=False).pair_question()
        == "Is it clear to identify the object in the hand?"
    )


def test_sft2_conversation_is_q1_answer_q6_clarity():
    turns = cot.conversation(Prompts(), "q1q6", "can", unclear=True)
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert [t["value"] for t in turns[1:]] == ["The object is can.", Prompts().q6, "No."]


def test_read_rows_keeps_good_rows_in_input_order(q1_file):
    table, report = cot.read_rows(q1_file)
    assert list(table["cls"]) == ["jar", "bowl", "can", "knife"]
    assert (report.ok, report.failed) == (4, 0)


def test_read_rows_takes_the_clarity_label_from_an_sft2_row(tmp_path):
    row = json.loads(q1_line("00000001", "jar"))
    row["conversations"] += [{"from": "human", "value": Prompts().q6}, {"from": "gpt", "value": "No."}]
    (tmp_path / "s.jsonl").write_text(dumps(row) + "\n")
    table, _ = cot.read_rows(tmp_path / "s.jsonl")
    assert table["unclear"].tolist() == [True]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"id": "00000009", "image": ', "line 2: malformed JSON"),
        (q1_line("00000009", "mug"), "line 2: unknown class 'mug'"),
        (q1_line("00000001", "jar"), "line 2: duplicate id '00000001' (first on line 1)"),
        (
            dumps({"id": "00000009", "image": "x.jpg", "conversations": []}),
            "line 2: 'conversations' must hold",
        ),
        (
            q1_line("00000009", "jar").replace("The object is jar.", "A jar."),
            "is not 'The object is <class>.'",
        ),
    ],
)
def test_bad_rows_are_quarantined_with_line_and_reason(tmp_path, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_text(q1_line("00000001", "jar") + "\n" + line + "\n" + q1_line("00000002", "can") + "\n")
    table, report = cot.read_rows(path)
    assert list(table["id"]) == ["00000001", "00000002"]
    assert report.failed == 1 and reason in report.quarantined[0].reason


def test_rows_whose_question_is_not_q1_are_quarantined(tmp_path):
    other = q1_line("00000002", "jar").replace(
        "What's the object in the hand?", "How many fingers are visible?"
    )
    path = tmp_path / "rows.jsonl"
    path.write_text(q1_line("00000001", "jar") + "\n" + other + "\n")
    table, report = cot.read_rows(path)
    assert list(table["id"]) == ["00000001"]
    assert [q.sample_id for q in report.quarantined] == ["00000002"]
    assert (
        "line 2: question 'How many fingers are visible?\\n<image>' is not Q1" in report.quarantined[0].reason
    )


def test_q1_with_the_image_token_first_or_without_it_is_q1(tmp_path):
    q1 = "What's the object in the hand?"
    path = tmp_path / "rows.jsonl"
    path.write_text(
        q1_line("00000001", "jar").replace(f"{q1}\\n<image>", f"<image>\\n{q1}")
        + "\n"
        + q1_line("00000002", "jar").replace(f"{q1}\\n<image>", q1)
        + "\n"
    )
    table, report = cot.read_rows(path)
    assert list(table["id"]) == ["00000001", "00000002"] and not report.quarantined


WRONG_ROWS = [
    json.loads(q1_line("00000001", "jar")),
    {"id": "", "image": "x.jpg", "conversations": []},
    {"id": "00000003", "image": "3.jpg"},
    {
        "id": "00000004",
        "image": "4.jpg",
        "conversations": [{"from": "gpt", "value": "The object is jar."}, {"from": "human", "value": "x"}],
    },
    json.loads(q1_line("00000005", "jar").replace("jar.", "remote control.")),
    json.loads(q1_line("00000001", "can")),
    {**json.loads(q1_line("00000007", "bowl")), "extra": 1},
    json.loads(q1_line("00000008", "can"))
    | {
        "conversations": json.loads(q1_line("8", "can"))["conversations"]
        + [{"from": "human", "value": Prompts().q6}, {"from": "gpt", "value": "No."}]
    },
    json.loads(q1_line("00000009", "can"))
    | {
        "conversations": json.loads(q1_line("9", "can"))["conversations"]
        + [{"from": "human", "value": Prompts().q6}, {"from": "gpt", "value": "Maybe"}]
    },
    json.loads(q1_line("00000010", "knife"))
    | {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "The object is jar."}]},
    json.loads(q1_line("00000011", "jar")) | {"image": None},
]


def test_a_file_arrow_reads_whole_and_one_read_line_by_line_are_judged_by_one_validator(tmp_path):
    whole, by_lines = tmp_path / "whole.jsonl", tmp_path / "lines.jsonl"
    whole.write_text("".join(dumps(r) + "\n" for r in WRONG_ROWS))
    by_lines.write_text(whole.read_text() + "\n")  # a blank last line: Arrow's count doubts the file
    assert cot._parse_whole_file(whole) is not None and cot._parse_whole_file(by_lines) is None
    (first, first_report), (second, second_report) = cot.read_rows(whole), cot.read_rows(by_lines)
    assert first.to_dict("list") == second.to_dict("list")
    assert first["id"].tolist() == ["00000001", "00000007", "00000008"]
    assert first_report.quarantined == [
        q if q.path != str(by_lines) else type(q)(q.sample_id, str(whole), q.reason)
        for q in second_report.quarantined
    ]
    reasons = {q.sample_id: q.reason for q in first_report.quarantined}
    assert reasons["line 2"] == "line 2: 'id' must be a non-empty string, got ''"
    assert reasons["00000003"].startswith("line 3: 'conversations' must hold at least 2 turns")
    assert reasons["00000004"] == "line 4: the first two turns must be from 'human' then 'gpt'"
    assert reasons["00000005"].startswith("line 5: unknown class 'remote control'")
    assert reasons["00000009"] == "line 9: clarity answer 'Maybe' is neither 'Yes.' nor 'No.'"
    assert reasons["00000011"] == "line 11: 'image' must be a non-empty string, got None"


def test_a_row_of_the_wrong_types_is_quarantined_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(q1_line("00000001", "jar") + "\n" + '{"id": 7, "image": "7.jpg"}\n')
    table, report = cot.read_rows(path)
    assert list(table["id"]) == ["00000001"]
    assert report.quarantined[0].reason.startswith("line 2: fields of the wrong type")


def test_a_blank_line_sends_the_file_to_the_line_reader(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(q1_line("00000001", "jar") + "\n\n" + q1_line("00000002", "jar") + "\n")
    assert cot._parse_whole_file(path) is None
    assert cot.read_rows(path)[0]["id"].tolist() == ["00000001", "00000002"]


def test_rows_whose_image_is_missing_are_quarantined(q1_file, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "00000000.jpg").write_bytes(b"jpeg")
    table, report = cot.read_rows(q1_file, image_root=tmp_path / "images")
    assert list(table["id"]) == ["00000000"]
    assert {q.reason for q in report.quarantined} == {f"line {n}: missing image" for n in (2, 3, 4)}


@pytest.mark.parametrize(
    "content", ['[{"answer": "00000001"}, {"answer": "00000003"}]', '["00000001", "00000003"]']
)
def test_unclear_ids_read_the_upstream_and_the_plain_list(tmp_path, content):
    (tmp_path / "ids.json").write_text(content)
    assert cot.read_unclear_ids(tmp_path / "ids.json") == {"00000001", "00000003"}


def test_unclear_ids_of_another_shape_name_the_file_and_item(tmp_path):
    (tmp_path / "ids.json").write_text('[{"answer": "00000001"}, {"id": 3}]')
    with pytest.raises(BadSample, match=r"ids.json: item 1"):
        cot.read_unclear_ids(tmp_path / "ids.json")


def test_cot_replaces_exactly_the_configured_fraction():
    rows = cot.build_rows(table_of(200), "cot", CotConfig(cot_fraction=0.25))
    assert (rows["turns"] == "q0").sum() == 50 and (rows["turns"] == "q1q6").sum() == 150


def test_cot_choice_is_reproducible_for_a_seed_and_moves_with_it():
    pick = [cot.build_rows(table_of(200), "cot", CotConfig(seed=s))["turns"].tolist() for s in (1, 1, 2)]
    assert pick[0] == pick[1] != pick[2]


def test_sft2_rows_need_clarity_labels():
    table = cot.sample_table(["1"], ["1.jpg"], ["jar"], [None])
    with pytest.raises(ValueError, match="no clarity label"):
        cot.build_rows(table, "sft2")


def test_limit_keeps_the_first_rows_in_order():
    rows = cot.build_rows(table_of(10), "sc", CotConfig(limit=3))
    assert rows["id"].tolist() == ["00000000", "00000001", "00000002"] and set(rows["turns"]) == {"q1"}


def test_encoded_rows_are_the_json_of_each_row():
    rows = cot.build_rows(table_of(8), "cot", CotConfig(cot_fraction=0.5))
    prompts = Prompts()
    expected = [
        dumps(
            {
                "id": r.id,
                "image": r.image,
                "conversations": cot.conversation(prompts, r.turns, r.cls, r.unclear),
            }
        )
        for r in rows.itertuples()
    ]
    assert list(cot.encode_rows(rows, prompts)) == expected


def test_tables_joined_from_shards_encode_like_one_table(tmp_path):
    whole = table_of(6)
    joined = pd.concat([whole.iloc[:3], whole.iloc[3:]], ignore_index=True)
    rows, joined_rows = cot.build_rows(whole, "sft2"), cot.build_rows(joined, "sft2")
    assert cot.encode_rows(joined_rows, Prompts()) == cot.encode_rows(rows, Prompts())
    assert cot.trl_table(joined_rows, Prompts(), tmp_path) == cot.trl_table(rows, Prompts(), tmp_path)


def test_trl_rows_put_the_last_answer_in_the_completion(tmp_path):
    rows = cot.build_rows(table_of(2), "sft2")
    table = cot.trl_table(rows, Prompts(), tmp_path).to_pylist()
    assert table[0]["images"] == [str(tmp_path / "00000000.jpg")]
    assert [m["role"] for m in table[0]["prompt"]] == ["user", "assistant", "user"]
    assert table[0]["prompt"][0]["content"] == "What's the object in the hand?"
    assert table[0]["completion"] == [{"role": "assistant", "content": "No."}]


def test_occ_cot_build_writes_jsonl_parquet_and_meta(tmp_path, q1_file):
    (tmp_path / "ids.json").write_text('[{"answer": "00000001"}]')
    out = tmp_path / "out" / "sft2.jsonl"
    result = CliRunner().invoke(
        main,
        [
            "cot",
            "build",
            "--stage",
            "sft2",
            "--source",
            str(q1_file),
            "--unclear-ids",
            str(tmp_path / "ids.json"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    answers = [json.loads(line)["conversations"][3]["value"] for line in out.read_text().splitlines()]
    assert answers == ["Yes.", "No.", "Yes.", "Yes."]
    assert pq.read_table(out.with_suffix(".parquet")).num_rows == 4
    assert json.loads((tmp_path / "out" / "sft2.meta.json").read_text())["sft2"]["length"] == 4


def test_occ_cot_build_sft2_without_any_label_is_a_usage_error(tmp_path, q1_file):
    result = CliRunner().invoke(
        main,
        ["cot", "build", "--stage", "sft2", "--source", str(q1_file), "--out", str(tmp_path / "o.jsonl")],
    )
    assert result.exit_code == 2 and "--unclear-ids" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_sft2_whose_unclear_ids_name_no_row_is_an_error_with_the_counts(tmp_path, q1_file):
    (tmp_path / "ids.json").write_text('[{"answer": "99999999"}]')
    out = tmp_path / "sft2.jsonl"
    args = ["cot", "build", "--stage", "sft2", "--source", str(q1_file), "--unclear-ids"]
    result = CliRunner().invoke(main, [*args, str(tmp_path / "ids.json"), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "one clarity answer only: 4 'Yes.', 0 'No.'" in result.output
    assert "1 unclear id names no row" in result.output and "--allow-degenerate" in result.output
    assert not out.exists()
    result = CliRunner().invoke(
        main, [*args, str(tmp_path / "ids.json"), "--out", str(out), "--allow-degenerate"]
    )
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 4


def test_every_row_quarantined_is_an_error(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(q1_line("00000001", "mug") + "\n")
    with pytest.raises(cot.DegenerateOutput, match=r"no rows \(1 source row, 1 quarantined"):
        cot.build("sft1", source, tmp_path / "o.jsonl")


def test_a_negative_seed_is_a_usage_error_naming_the_seed(tmp_path, q1_file):
    (tmp_path / "ids.json").write_text('["00000001"]')
    result = CliRunner().invoke(
        main,
        ["cot", "build", "--stage", "cot", "--source", str(q1_file), "--out", str(tmp_path / "o.jsonl")]
        + ["--unclear-ids", str(tmp_path / "ids.json"), "--seed", "-1"],
    )
    assert result.exit_code == 2 and "--seed" in result.output
    assert "--unclear-ids" not in result.output
