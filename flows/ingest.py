"""The ingest flow: mirror ObMan splits from S3 into a local root, one task per shard of keys.

Run::

    python -m flows.ingest s3://BUCKET/PREFIX --dest ROOT [--endpoint-url URL]

or call ``ingest_flow(SyncConfig(...))`` from another flow (the demo does). ``occ ingest`` runs the
same engine without Prefect, for speed; see occ_core.s3sync for what is checked and skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from occ_core.s3sync import SyncConfig, config_from_options
from tasks.ingest import finish_ingest, plan_ingest, sync_shard


# Shards share one pool of `workers` transfer threads; a few shards in flight keep it busy.
@flow(name="ingest", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=4))
def ingest_flow(params: SyncConfig) -> dict[str, Any]:
    """List and plan, sync every shard, write the manifest; returns the summary row."""
    plan = plan_ingest(params)
    shards = plan.shards(params.shard_size)
    rows = sync_shard.map(shards, range(len(shards)), unmapped(params))
    summary = finish_ingest(params, plan.started, rows)
    print(
        f"ingest {params.source} -> {summary['dest']}: {summary['ok']} downloaded, "
        f"{summary['skipped']} skipped, "
        f"{summary['failed']} failed in {summary['seconds']} s"
    )
    return summary


@click.command()
@click.argument("source")
@click.option(
    "--dest",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=SyncConfig.model_fields["dest"].description,
)
@click.option("--endpoint-url", help=SyncConfig.model_fields["endpoint_url"].description)
def cli(source: str, dest: Path, endpoint_url: str | None) -> None:
    """Run the ingest flow with default parameters."""
    ingest_flow(config_from_options(source, dest, endpoint_url=endpoint_url))


if __name__ == "__main__":
    cli()
