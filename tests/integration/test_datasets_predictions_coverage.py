"""The datasets stage with predictions that cover only part of the split, and its held-out agreement.

Run: .venv/bin/python -m pytest tests/integration/test_datasets_predictions_coverage.py -q
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from occ_core import datasets, obman
from occ_core.datasets import DatasetsConfig
from occ_core.errors import BadSample

pytestmark = pytest.mark.integration


@pytest.fixture
def partial_predictions(tmp_path, tiny_obman):
    """Right answers for 2 of the 5 train images, plus 3 ids of no train image (another split's)."""
    refs = obman.list_samples(tiny_obman, "train")
    answers = {
        r.sample_id: f"The object is {obman.qa_class(obman.load_meta(r.meta_path))}." for r in refs[:2]
    }
    answers.update({f"9{i:07d}": "The object is jar." for i in range(3)})
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(answers))
    return path


def test_partial_predictions_stop_the_stage_naming_the_counts(tiny_obman, occ_home, partial_predictions):
    with pytest.raises(BadSample, match="only 2 of the 5 sample ids"):
        datasets.run(DatasetsConfig(root=tiny_obman, predictions=partial_predictions))


def test_allowed_partial_predictions_leave_the_other_images_unlabelled(
    tiny_obman, occ_home, partial_predictions
):
    cfg = DatasetsConfig(root=tiny_obman, predictions=partial_predictions, allow_partial_predictions=True)
    summary = datasets.run(cfg)
    table = pd.read_parquet(occ_home / "datasets" / summary["key"] / "samples.parquet")
    assert int(table["model_error"].isna().sum()) == 3 and summary["model_errors"]["missing"] == 3
    assert summary["agreement"]["samples"] == 2
    assert summary["agreement"]["held_out"].startswith("2 folds, seed 0")


def test_occ_datasets_cli_takes_the_partial_predictions_flag(tiny_obman, occ_home, partial_predictions):
    args = ["--root", str(tiny_obman), "--predictions", str(partial_predictions)]
    refused = CliRunner().invoke(datasets.cli, args)
    assert refused.exit_code == 1 and "--allow-partial-predictions" in refused.output
    assert "Traceback" not in refused.output
    allowed = CliRunner().invoke(datasets.cli, [*args, "--allow-partial-predictions"])
    assert allowed.exit_code == 0, allowed.output
