"""Byte-level formats: the commands repeat hand-written rows in the upstream files' exact form.

The fixtures below are written by hand in the form of the method's files (occ-mllm-v1
``train_Q1_10140``, ``train_Q1_Q6_10140``, ``train_Q1_Q6_Q0_4_balanced_10140``,
``train_Q1_Q6_balanced_dpo_10140``): key order, ``", "``/``": "`` separators, ``\\n`` in strings
escaped, one row per line, a newline after the last row. Ids and classes are made up.

Run: .venv/bin/python -m pytest tests/unit/test_datasets_formats.py -q
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from occ_core import cot
from occ_core.cli import main

Q1 = (
    b'{"id": "00000040", "image": "00000040.jpg", "conversations": [{"from": "human", "value": "What\'s the object '
    b'in the hand?\\n<image>"}, {"from": "gpt", "value": "The object is knife."}]}\n'
    b'{"id": "00000058", "image": "00000058.jpg", "conversations": [{"from": "human", "value": "What\'s the object '
    b'in the hand?\\n<image>"}, {"from": "gpt", "value": "The object is bowl."}]}\n'
    b'{"id": "00000060", "image": "00000060.jpg", "conversations": [{"from": "human", "value": "What\'s the object '
    b'in the hand?\\n<image>"}, {"from": "gpt", "value": "The object is cellphone."}]}\n'
)
WRONG_IDS = b'[{"answer": "00000058"}, {"answer": "00099999"}]'
SFT2 = (
    b'{"id": "00000040", "image": "00000040.jpg", "conversations": [{"from": "human", "value": "What\'s the object '
    b'in the hand?\\n<image>"}, {"from": "gpt", "value": "The object is knife."}, {"from": "human", "value": "Is it '
    b'clear to identify the object in the hand?"}, {"from": "gpt", "value": "Yes."}]}\n'
    b'{"id": "00000058", "image": "00000058.jpg", "conversations": [{"from": "human", "value": "What\'s the object '
    b'in the hand?\\n<image>"}, {"from": "gpt", "value": "The object is bowl."}, {"from": "human", "value": "Is it '
    b'clear to identify the object in the hand?"}, {"from": "gpt", "value": "No."}]}\n'
    b'{"id": "00000060", "image": "00000060.jpg", "conversations": [{"from": "human", "value": "What\'s the object '
    b'in the hand?\\n<image>"}, {"from": "gpt", "value": "The object is cellphone."}, {"from": "human", "value": '
    b'"Is it clear to identify the object in the hand?"}, {"from": "gpt", "value": "Yes."}]}\n'
)
Q0_ROW_00000058 = (
    b'{"id": "00000058", "image": "00000058.jpg", "conversations": [{"from": "human", "value": "Please analyze this '
    b'image step by step.\\n<image>"}, {"from": "gpt", "value": "Step 1: I will analyze this RGB image and identify '
    b"the object in the hand. Step 2: I will assess whether the object in the hand can be clearly identified from the "
    b"original image. Step 3: Based on the assessment in Step 2, if clear: I will describe the object based on "
    b"orignal features present in the image; if unclear: I will apply a 3D reconstruction model to render an "
    b'enhanced version of the image, then use this rendered image to identify the object."}]}\n'
)
PAIRS = (
    b'{"image": "00000040.jpg", "question": "Is it clear to identify the object in the hand?\\n", "chosen": "Yes.", '
    b'"rejected": "No."}\n'
    b'{"image": "00000058.jpg", "question": "Is it clear to identify the object in the hand?\\n", "chosen": "No.", '
    b'"rejected": "Yes."}\n'
    b'{"image": "00000060.jpg", "question": "Is it clear to identify the object in the hand?\\n", "chosen": "Yes.", '
    b'"rejected": "No."}\n'
)


@pytest.fixture
def files(tmp_path):
    for name, content in {"q1.jsonl": Q1, "wrong.json": WRONG_IDS, "sft2.jsonl": SFT2}.items():
        (tmp_path / name).write_bytes(content)
    return tmp_path


def write_images(folder):
    for name in ("00000040", "00000058", "00000060"):
        Image.new("RGB", (8, 8)).save(folder / f"{name}.jpg")


def occ(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def test_sft1_from_q1_rows_repeats_them_byte_for_byte(files):
    occ(
        "cot",
        "build",
        "--stage",
        "sft1",
        "--source",
        str(files / "q1.jsonl"),
        "--out",
        str(files / "o.jsonl"),
    )
    assert (files / "o.jsonl").read_bytes() == Q1


def test_sft2_from_q1_rows_and_the_wrong_list_is_the_upstream_sft2_file(files):
    occ(
        "cot",
        "build",
        "--stage",
        "sft2",
        "--source",
        str(files / "q1.jsonl"),
        "--unclear-ids",
        str(files / "wrong.json"),
        "--out",
        str(files / "o.jsonl"),
    )
    assert (files / "o.jsonl").read_bytes() == SFT2


def test_sc_with_a_limit_is_the_first_q1_rows(files):
    occ(
        "cot",
        "build",
        "--stage",
        "sc",
        "--source",
        str(files / "q1.jsonl"),
        "--limit",
        "2",
        "--out",
        str(files / "o.jsonl"),
    )
    assert (files / "o.jsonl").read_bytes() == b"".join(Q1.splitlines(keepends=True)[:2])


def build_cot(files, fraction: str) -> bytes:
    """``occ cot build --stage cot`` on the SFT2 rows with a given CoT fraction; the JSONL written."""
    out = files / "o.jsonl"
    occ("cot", "build", "--stage", "cot", "--source", str(files / "sft2.jsonl"), "--cot-fraction", fraction,
        "--out", str(out))  # fmt: skip
    return out.read_bytes()


def test_a_cot_row_is_the_upstream_q0_row(files):
    assert build_cot(files, "1").splitlines(keepends=True)[1] == Q0_ROW_00000058


def test_cot_rows_not_replaced_stay_sft2_rows(files):
    assert build_cot(files, "0") == SFT2


def test_unbalanced_pairs_from_sft2_rows_are_the_upstream_dpo_file(files):
    occ(
        "pairs",
        "build",
        "--source",
        str(files / "sft2.jsonl"),
        "--no-balance",
        "--out",
        str(files / "p.jsonl"),
    )
    assert (files / "p.jsonl").read_bytes() == PAIRS


def test_text_outside_ascii_is_written_as_utf8_not_escaped():
    table = cot.sample_table(["é1"], ["é1.jpg"], ["jar"], [None])
    line = cot.encode_rows(cot.build_rows(table, "sft1"), cot.Prompts())[0]
    assert '"id": "é1"' in line and json.loads(line)["image"] == "é1.jpg"


@pytest.mark.parametrize("name", ['a"b.jpg', "a\\b.jpg", "a\tb.jpg", "a\x01b.jpg"])
def test_strings_json_must_escape_are_escaped_as_json_dumps_does(name):
    table = cot.sample_table(["1"], [name], ["jar"], [None])
    line = cot.encode_rows(cot.build_rows(table, "sft1"), cot.Prompts())[0]
    assert line.startswith('{"id": "1", "image": ' + json.dumps(name, ensure_ascii=False) + ", ")


def test_meta_json_is_an_internvl_dataset_entry(files):
    write_images(files)
    occ(
        "pairs",
        "build",
        "--source",
        str(files / "sft2.jsonl"),
        "--no-balance",
        "--out",
        str(files / "p.jsonl"),
        "--image-root",
        str(files),
    )
    meta = json.loads((files / "p.meta.json").read_text())
    assert meta == {
        "p": {
            "root": str(files),
            "annotation": str(files / "p.jsonl"),
            "data_augment": False,
            "repeat_time": 1,
            "length": 3,
        }
    }


def test_sft_parquet_loads_as_a_trl_prompt_completion_dataset(files):
    from datasets import Image as ImageFeature
    from datasets import Sequence, load_dataset

    write_images(files)
    occ(
        "cot",
        "build",
        "--stage",
        "sft2",
        "--source",
        str(files / "sft2.jsonl"),
        "--image-root",
        str(files),
        "--out",
        str(files / "o.jsonl"),
    )
    dataset = load_dataset(
        "parquet", data_files=str(files / "o.parquet"), split="train", cache_dir=str(files / "hf")
    )
    assert dataset.column_names == ["id", "images", "messages", "prompt", "completion"]
    assert dataset[1]["completion"] == [{"role": "assistant", "content": "No."}]
    # The whole conversation, image after the question as upstream, every answer an assistant turn.
    chat = dataset[1]["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert chat[0]["content"] == [
        {"type": "text", "text": "What's the object in the hand?\n"},
        {"type": "image", "text": None},
    ]
    assert (
        chat[1]["content"][0]["text"].startswith("The object is ") and chat[3]["content"][0]["text"] == "No."
    )
    decoded = dataset.cast_column("images", Sequence(ImageFeature()))
    assert decoded[0]["images"][0].size == (8, 8)


def test_pairs_parquet_loads_as_a_trl_preference_dataset(files):
    from datasets import load_dataset

    occ(
        "pairs",
        "build",
        "--source",
        str(files / "sft2.jsonl"),
        "--no-balance",
        "--out",
        str(files / "p.jsonl"),
    )
    dataset = load_dataset(
        "parquet", data_files=str(files / "p.parquet"), split="train", cache_dir=str(files / "hf")
    )
    assert dataset.column_names == ["id", "images", "prompt", "chosen", "rejected"]
    assert dataset[1]["chosen"] == [{"role": "assistant", "content": "No."}]
