"""Prefect tasks of evaluation: the protocol on one checkpoint and one fallback backend, and the report.

An evaluation is cached on the checkpoint's weights, the test set as the protocol sees it (ids, truth,
image and render bytes: ``infer.test_set_fingerprint``) and the settings that change answers, while
its scores file exists; a killed run resumes from its finished shards (``infer.run_protocol``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import CacheKeyFnPolicy

from occ_core.evaluate import infer
from occ_core.evaluate.infer import InferConfig
from occ_core.stage import params_hash
from occ_core.train.checkpoint import check_model_dir, fingerprint


def _evaluation_key(context: Any, parameters: dict[str, Any]) -> str | None:
    checkpoint, test_data, views = parameters["checkpoint"], parameters["test_data"], parameters["views"]
    split, cfg = parameters["split"], parameters["cfg"]
    out = infer.default_out(checkpoint, test_data, split, views, cfg)
    if not (out / "predictions.scores.json").is_file():
        return None
    items = infer.items_from_dataset(test_data)
    return (
        f"evaluate-{fingerprint(check_model_dir(checkpoint))[:16]}-"
        f"{infer.test_set_fingerprint(items, views, split)[:16]}-{params_hash(cfg.plan_params())}"
    )


@task(
    name="evaluate-checkpoint",
    task_run_name="evaluate-{stage}-{backend}",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_evaluation_key),
    persist_result=True,
    retries=1,
    retry_delay_seconds=5,
    tags=["gpu"],
)
def evaluate_checkpoint(
    checkpoint: Path, stage: str, backend: str, test_data: Path, views: Path, split: str, cfg: InferConfig
) -> dict[str, Any]:
    """Description, reflection and decision of one stage's model with one backend's renders."""
    out = infer.default_out(checkpoint, test_data, split, views, cfg)
    scores = infer.evaluate(checkpoint, infer.items_from_dataset(test_data), views, split, out, cfg)
    return {"stage": stage, "backend": backend, "out": str(out), **scores}


@task(name="evaluation-report", tags=["cpu"])
def publish_report(
    results: dict[str, dict[str, dict[str, Any]]],
    test_data: Path,
    gate: str,
    gate_backend: str,
    examples: int,
) -> dict[str, Any]:
    """Write the report of ``results``, publish it as artifacts, then apply the promotion gate.

    The report folder is named by the evaluation folders it reads, so a changed score writes a new one.
    Raises:
        PromotionError: MPO does not beat SFT2 on decision with the gate in fail mode (after publishing).
    """
    from occ_core.evaluate import report as reporting
    from occ_core.stage import stage_dir

    key = params_hash({s: {b: r["out"] for b, r in by.items()} for s, by in results.items()})
    out = stage_dir("evaluate", f"report-{key}")
    images = {item.id: item.image for item in infer.items_from_dataset(test_data)}
    written = reporting.build_report(results, out, images if examples else None, examples)
    create_table_artifact(
        key="evaluation-scores",
        table=written["rows"],
        description=f"description, reflection, decision and 3D plus per stage and backend ({out})",
    )
    create_markdown_artifact(
        key="evaluation-report", markdown=reporting.render_markdown(written, embed_dir=out)
    )
    verdict = reporting.promotion_gate(results, gate_backend, gate)  # raises in fail mode
    return {
        **written,
        "dir": str(out),
        "gate": {"mode": verdict.mode, "passed": verdict.passed, "message": verdict.message},
    }
