"""Prefect tasks of the embedded default: the synthetic dataset and its upload to the local S3 server."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from occ_core import s3server, synth


# No Prefect cache: generate() is itself a no-op on a complete dataset, and a cached path would
# outlive a deleted data root.
@task(name="synthesize-obman", tags=["cpu"])
def synthesize(n: int, seed: int, splits: tuple[str, ...]) -> Path:
    """Generate (or find, when already complete) a synthetic ObMan under its stage directory."""
    cfg = synth.staged_config(n=n, seed=seed, splits=splits)
    report = synth.generate(cfg)
    create_table_artifact(key="synth-summary", table=[report.summary() | {"root": str(cfg.out)}])
    return cfg.out


@task(name="upload-to-s3", retries=2, retry_delay_seconds=2, tags=["io"])
def upload(root: Path, bucket: str, prefix: str, endpoint_url: str) -> s3server.UploadReport:
    """Put a local dataset tree into ``s3://bucket/prefix`` on the given server."""
    return s3server.upload_tree(root, bucket, prefix, endpoint_url)
