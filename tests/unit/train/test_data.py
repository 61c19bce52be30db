"""Training rows: the trl Parquet's ``messages`` and the JSONL rows train every answer and nothing else."""

from __future__ import annotations

import datasets
import pytest
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from occ_core.cot import content_blocks
from occ_core.train import data
from occ_core.train.crossfit import folds_of
from occ_core.train.tiny import build_tiny


@pytest.fixture(scope="module")
def processor():
    return build_tiny()[1]


def _trained_text(processor, example: dict) -> str:
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    labels = collator([example])["labels"][0]
    return processor.tokenizer.decode(labels[labels != -100])


@pytest.mark.parametrize("source", ["parquet", "jsonl"])
def test_sft2_rows_train_the_q1_answer_and_the_clarity_answer_only(processor, train_data, source):
    if source == "parquet":
        table = datasets.load_dataset("parquet", data_files=str(train_data / "sft2.parquet"), split="train")
        table = table.select_columns(["images", "messages"])
    else:
        table = data.to_dataset(data.load_sft(train_data, "sft2"))
    table = table.cast_column("images", datasets.Sequence(datasets.Image()))
    trained = _trained_text(processor, dict(table[0]))
    answer, clarity = trained.split("<|im_end|>")[:2]
    assert answer.startswith("The object is ") and clarity in ("Yes.", "No.")
    assert trained.count("<|im_end|>") == 2 and "What's" not in trained and "<IMG_CONTEXT>" not in trained


def test_image_blocks_stay_where_the_image_token_was():
    assert content_blocks("Q?\n<image>") == [
        {"type": "text", "text": "Q?\n"},
        {"type": "image", "text": None},
    ]
    assert content_blocks("<image>\nQ?") == [
        {"type": "image", "text": None},
        {"type": "text", "text": "\nQ?"},
    ]


def test_folds_cover_every_id_once_and_depend_on_the_seed():
    ids = [f"{i:08d}" for i in range(11)]
    folds = folds_of(ids, 2, seed=0)
    assert sorted(sum(folds, [])) == ids and not set(folds[0]) & set(folds[1])
    assert folds_of(ids, 2, seed=0) == folds and folds_of(ids, 2, seed=1) != folds
    with pytest.raises(ValueError, match="at least 2 folds"):
        folds_of(ids, 1, seed=0)
