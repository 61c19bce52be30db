"""Prefect tasks of the datasets stage: thin wrappers over occ_core.datasets.

Cache keys come from the stage key (input content, parameters, code), so an unchanged re-run reads
no mask and writes no file: the shard scans come back from Prefect's result cache, the outputs from
the complete stage directory.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import CacheKeyFnPolicy

from occ_core import datasets
from occ_core.datasets import DatasetsConfig, DatasetsPlan, ScanResult
from occ_core.stage import params_hash


def _scan_key(context: Any, parameters: dict[str, Any]) -> str:
    plan = parameters["plan"]
    return f"datasets-scan-{plan.scan_key}-{params_hash(plan.shards[parameters['index']])}"


def _outputs_key(context: Any, parameters: dict[str, Any]) -> str | None:
    # A deleted stage directory must be written again, so a cached summary stands only while its files do.
    plan = parameters["plan"]
    return f"datasets-build-{plan.key}" if plan.done else None


@task(name="plan-datasets", tags=["cpu"])
def plan_datasets(cfg: DatasetsConfig) -> DatasetsPlan:
    """Stage key, output directory and shards of one run."""
    return datasets.plan(cfg)


@task(
    name="scan-shard",
    task_run_name="scan-shard-{index}",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_scan_key),
    persist_result=True,
    tags=["cpu"],
)
def scan_shard(plan: DatasetsPlan, index: int, cfg: DatasetsConfig) -> ScanResult:
    """Class and visible share of every sample of one shard; bad samples quarantined."""
    return datasets.scan_shard(cfg.root, cfg.split, plan.shards[index])


@task(
    name="build-datasets",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_outputs_key),
    persist_result=True,
    tags=["cpu"],
)
def build_datasets(cfg: DatasetsConfig, plan: DatasetsPlan, scans: list[ScanResult]) -> dict[str, Any]:
    """Grade, write every dataset, and publish the statistics as table artifacts."""
    summary = datasets.build_outputs(cfg, plan, scans)
    create_table_artifact(
        key="datasets-unclear-by-class",
        table=summary["unclear_by_class"],
        description=f"Unclear rate per class, grader {summary['grader']}",
    )
    create_table_artifact(
        key="datasets-balance",
        table=summary["balance"],
        description="Clarity labels per class before and after balancing",
    )
    if summary["agreement"]:
        create_table_artifact(
            key="datasets-grader-agreement",
            table=[summary["agreement"]],
            description="model-errors (first) against visibility (second)",
        )
    return summary
