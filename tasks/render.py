"""Prefect tasks of the render stage: thin wrappers over moho_bridge.pipeline.

A shard task is cached on its stage key (the content of its input files, the backend and its settings,
the render settings, the code version) and the views directory: an unchanged re-run renders nothing.
The flow runs a shard whose outputs are gone (no marker in the views directory) with
``refresh_cache=True``, so a deleted output is rendered again rather than served from the cache. Bad
samples never fail a task (they are quarantined); a whole-shard failure is retried unless it is a
configuration or availability error (StageError), which a retry cannot fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.tasks import exponential_backoff

from moho_bridge import pipeline
from moho_bridge.pipeline import RenderParams, RenderPlan, RenderShard
from occ_core.errors import StageError
from occ_core.fsio import sha256_bytes
from occ_core.stage import StageReport


def _shard_key(context: Any, parameters: dict[str, Any]) -> str:
    views_dir = parameters["views_dir"]
    return f"render-shard-{parameters['shard'].key}-{sha256_bytes(str(views_dir).encode())[:16]}"


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    return not isinstance(state.result(raise_on_failure=False), StageError)


@task(name="plan-render", tags=["cpu"])
def plan_render(params: RenderParams) -> RenderPlan:
    """Shards, their stage keys and the views directory of one run."""
    return pipeline.plan_render(params)


@task(
    name="render-shard",
    task_run_name="render-shard-{shard.index}",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_shard_key),
    persist_result=True,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=_worth_retrying,
    tags=["cpu", "render"],
)
def render_shard(shard: RenderShard, params: RenderParams, views_dir: Path) -> StageReport:
    """Reconstruct and render one shard into the run's views directory."""
    return pipeline.render_shard(shard, params, views_dir)


@task(name="summarize-render", tags=["cpu"])
def summarize_render(reports: list[StageReport], plan: RenderPlan, params: RenderParams) -> dict[str, Any]:
    """Merge the shards, write the contact sheet, publish the table and the sheet's link."""
    summary = pipeline.summarize_render(reports, plan, params)
    create_table_artifact(
        key="render-summary",
        table=summary["shards"],
        description=f"{params.backend} backend, split {params.split}: views in {plan.views_dir}",
    )
    if summary["contact_sheet"]:
        create_markdown_artifact(
            key="render-contact-sheet",
            markdown=f"[Contact sheet]({summary['contact_sheet']}): input photo, then view 0 and the orbit "
            f"views of the first rendered samples ({params.backend} backend).",
        )
    return summary
