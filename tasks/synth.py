"""Prefect tasks of the embedded default: the synthetic dataset and its upload to the local S3 server."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from occ_core import obman, s3server, shapes, synth
from occ_core.stage import code_version, stage_dir, stage_key


@task(name="synthesize-obman", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, tags=["cpu"])
def synthesize(n: int, seed: int, splits: tuple[str, ...]) -> Path:
    """Generate (or find, when already complete) a synthetic ObMan under its stage directory."""
    content = synth.SynthConfig(out=Path("."), n=n, seed=seed, splits=splits).content_params()
    out = stage_dir("synth", stage_key([], content, code_version(synth, obman, shapes)))
    report = synth.generate(synth.SynthConfig(out=out, **content))
    create_table_artifact(key="synth-summary", table=[report.summary() | {"root": str(out)}])
    return out


@task(name="upload-to-s3", retries=2, retry_delay_seconds=2, tags=["io"])
def upload(root: Path, bucket: str, prefix: str, endpoint_url: str) -> s3server.UploadReport:
    """Put a local dataset tree into ``s3://bucket/prefix`` on the given server."""
    return s3server.upload_tree(root, bucket, prefix, endpoint_url)
