"""The datasets flow: an ObMan split, graded for clarity, becomes the data of every training stage.

Run::

    python -m flows.datasets --root ROOT [--split train]

or call ``datasets_flow(DatasetsConfig(root=...))`` from another flow (the demo does). Shards are
scanned in parallel by the flow's task runner; see occ_core.datasets for the outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from prefect import flow, unmapped

from occ_core.datasets import DatasetsConfig, config_from_options, summary_lines
from tasks.datasets import build_datasets, plan_datasets, scan_shard


@flow(name="datasets", log_prints=True)
def datasets_flow(params: DatasetsConfig) -> dict[str, Any]:
    """Plan, scan the shards, grade and write; returns the statistics the demo prints."""
    plan = plan_datasets(params)
    scans = [] if plan.done else scan_shard.map(unmapped(plan), range(len(plan.shards)), unmapped(params))
    summary = build_datasets(params, plan, scans)
    for line in summary_lines(summary):
        print(line)
    return summary


@click.command()
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help=DatasetsConfig.model_fields["root"].description,
)
@click.option(
    "--split", default="train", show_default=True, help=DatasetsConfig.model_fields["split"].description
)
def cli(root: Path, split: str) -> None:
    """Run the datasets flow with default parameters on one split."""
    datasets_flow(config_from_options(root=root, split=split))


if __name__ == "__main__":
    cli()
