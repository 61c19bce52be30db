"""Prefect tasks of the ingest stage: plan (listing joined with the manifest), one sync per shard of
keys, and a finish step that writes the manifest once and publishes the summary.

Shards never write the manifest themselves (they would race): each keeps a checkpoint under
``ROOT/.occ-manifest.d/``, which the next run reads if this one stops half-way.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from occ_core import s3sync
from occ_core.s3sync import ManifestRow, PlannedObject, SyncConfig, SyncPlan


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry only S3 5xx, throttling, timeouts and dropped connections."""
    try:
        state.result()
    except Exception as exc:
        return s3sync.is_transient(exc)
    return False


# The manifest, not Prefect's cache, makes a re-run cheap; hashing 150k planned objects for a cache
# key would cost more than it saves.
_RETRYING = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=only_transient,
    cache_policy=NO_CACHE,
    tags=["io"],
)


@task(name="plan-ingest", **_RETRYING)
def plan_ingest(cfg: SyncConfig) -> SyncPlan:
    """List the configured folders and pair each object with its local path and manifest row."""
    return s3sync.plan_sync(cfg, s3sync.client_for(cfg))


@task(name="sync-shard", task_run_name="sync-shard-{index}", **_RETRYING)
def sync_shard(shard: list[PlannedObject], index: int, cfg: SyncConfig) -> list[ManifestRow]:
    """Bring one shard of keys into place; transient leftovers raise so Prefect retries the shard."""
    return s3sync.sync_shard(shard, cfg, name=f"shard-{index:05d}")


@task(name="finish-ingest", cache_policy=NO_CACHE)
def finish_ingest(cfg: SyncConfig, started: float, shard_rows: list[list[ManifestRow]]) -> dict[str, Any]:
    """Write the manifest, publish the summary (and any failed keys) as table artifacts.

    ``started`` is when planning began (``SyncPlan.started``), for the run's duration and throughput.
    """
    report = s3sync.finish_sync(cfg, [row for rows in shard_rows for row in rows], started)
    summary = report.summary() | {"source": cfg.source, "dest": str(cfg.dest)}
    create_table_artifact(key="ingest-summary", table=[summary], description=f"ingest {cfg.source}")
    if report.quarantined:
        failures = s3sync.failure_table(report)
        create_table_artifact(key="ingest-failures", table=failures, description="failed or rejected keys")
    return summary
