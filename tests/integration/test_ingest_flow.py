"""The ingest flow under a real (temporary) Prefect server, against a real moto S3 server.

.venv/bin/python -m pytest tests/integration/test_ingest_flow.py -q
"""

from __future__ import annotations

import json

import pytest

from occ_core import s3sync
from occ_core.s3sync import DOWNLOADED, REJECTED, SKIPPED, SyncConfig

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def objects(s3_bucket, s3_client) -> dict[str, bytes]:
    objects = {
        f"obman/{split}/rgb/{i:08d}.jpg": f"{split}-{i}".encode()
        for split in ("train", "val")
        for i in range(4)
    }
    for key, data in objects.items():
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=data)
    return objects


def test_flow_mirrors_the_bucket_writes_the_manifest_and_a_summary_artifact(
    s3_bucket, s3_endpoint, objects, tmp_path
):
    from prefect.artifacts import Artifact

    from flows.ingest import ingest_flow

    cfg = SyncConfig(
        source=f"s3://{s3_bucket}/obman", dest=tmp_path, endpoint_url=s3_endpoint, shard_size=3, workers=2
    )
    summary = ingest_flow(cfg)

    assert (summary["ok"], summary["skipped"], summary["failed"]) == (len(objects), 0, 0)
    assert all((tmp_path / key.removeprefix("obman/")).read_bytes() == data for key, data in objects.items())
    assert {row.status for row in s3sync.load_manifest(tmp_path).values()} == {DOWNLOADED}
    artifact = Artifact.get("ingest-summary")
    assert json.loads(artifact.data)[0]["ok"] == len(objects)


def test_flow_rerun_skips_everything_and_reports_rejected_keys(
    s3_bucket, s3_endpoint, s3_client, objects, tmp_path
):
    from flows.ingest import ingest_flow

    cfg = SyncConfig(
        source=f"s3://{s3_bucket}/obman", dest=tmp_path, endpoint_url=s3_endpoint, shard_size=3, workers=2
    )
    ingest_flow(cfg)
    s3_client.put_object(Bucket=s3_bucket, Key="obman/val/../../evil", Body=b"escape")
    summary = ingest_flow(cfg)

    assert (summary["ok"], summary["skipped"], summary["failed"], summary["rejected"]) == (
        0,
        len(objects),
        1,
        1,
    )
    statuses = {row.key: row.status for row in s3sync.load_manifest(tmp_path).values()}
    assert statuses.pop("obman/val/../../evil") == REJECTED
    assert set(statuses.values()) == {SKIPPED}
    assert not list((tmp_path / s3sync.CHECKPOINT_DIR).glob("*.parquet"))


def test_flow_against_a_dead_endpoint_logs_and_raises_no_credentials(tmp_path, monkeypatch):
    import asyncio
    import socket

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    import flows.ingest

    secrets = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID123456", "AWS_SESSION_TOKEN": "FAKESESSIONTOKEN0123456789"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fakeSecretAccessKey0123456789abcdef")
    # The plan task's own retries (5-20 s apart) would only repeat the same refusal.
    monkeypatch.setattr(flows.ingest, "plan_ingest", flows.ingest.plan_ingest.with_options(retries=0))
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = SyncConfig(
        source="s3://occ-bucket/obman", dest=tmp_path, endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1
    )
    state = flows.ingest.ingest_flow(cfg, return_state=True)
    APILogHandler().flush()  # the logs go to the API in the background

    async def flow_run_logs() -> list[str]:
        async with get_client() as client:
            flow_run_id = state.state_details.flow_run_id
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return [log.message for log in logs]

    messages = asyncio.run(flow_run_logs())
    assert state.is_failed() and any("cannot list s3://occ-bucket/obman" in text for text in messages)
    texts = [*messages, state.message or "", str(state.result(raise_on_failure=False))]
    for word in [*secrets.values(), "Signature=", "AWSAccessKeyId"]:
        assert not [text for text in texts if word in text], word
