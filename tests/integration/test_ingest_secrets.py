"""No credential, session token or signature reaches anything ``occ ingest`` writes, when requests fail.

Runs the real command against a dead endpoint and against a moto server killed mid-sync, with known
fake credentials in the environment, then searches stdout, stderr, the manifest (every column) and any
checkpoint for them.

.venv/bin/python -m pytest tests/integration/test_ingest_secrets.py -q
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from occ_core import s3sync
from occ_core.s3server import local_client, start_s3_server
from occ_core.s3sync import FAILED, SyncConfig

pytestmark = pytest.mark.integration

FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID123456",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretAccessKey0123456789abcdefABCDEF",
    "AWS_SESSION_TOKEN": "FAKESESSIONTOKEN0123456789abcdefghij",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# The values themselves, and the names that would carry a signed URL's credentials.
FORBIDDEN = (
    FAKE["AWS_ACCESS_KEY_ID"],
    FAKE["AWS_SECRET_ACCESS_KEY"],
    FAKE["AWS_SESSION_TOKEN"],
    "Signature=",
    "X-Amz-Signature",
    "X-Amz-Credential",
    "AWSAccessKeyId",
)
OCC = str(Path(sys.executable).with_name("occ"))


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    return env | FAKE


def manifest_text(dest: Path) -> str:
    """Every cell of the manifest and of any checkpoint, as text."""
    import pyarrow.parquet as pq

    paths = [dest / s3sync.MANIFEST_NAME, *(dest / s3sync.CHECKPOINT_DIR).glob("*.parquet")]
    return "\n".join(str(pq.ParquetFile(path).read().to_pydict()) for path in paths if path.exists())


def leaks(*texts: str) -> list[str]:
    return [word for word in FORBIDDEN if any(word in text for text in texts)]


def ingest_command(bucket: str, endpoint: str, dest: Path, *extra: str) -> list[str]:
    command = [OCC, "-vv", "ingest", f"s3://{bucket}/obman", "--dest", str(dest), "--endpoint-url", endpoint]
    return [*command, "--max-attempts", "1", "--quiet", *extra]


@pytest.mark.parametrize("verbosity", [[], ["-vv"]], ids=["quiet", "debug-logs"])
def test_dead_endpoint_prints_no_credentials(tmp_path, verbosity):
    dest = tmp_path / "mirror"
    command = ingest_command("occ-bucket", f"http://127.0.0.1:{free_port()}", dest)
    if not verbosity:
        command.remove("-vv")
    result = subprocess.run(command, capture_output=True, text=True, env=fake_env(), timeout=120)
    assert result.returncode == 1, result.stderr
    assert "cannot list s3://occ-bucket/obman" in result.stderr
    assert "Traceback" not in result.stderr
    assert leaks(result.stdout, result.stderr, manifest_text(dest)) == []


def test_server_killed_mid_sync_leaves_no_credentials_in_output_or_manifest(tmp_path):
    dest = tmp_path / "mirror"
    with start_s3_server() as server:
        client = local_client(server.endpoint_url, workers=8)
        client.create_bucket(Bucket="occ-killed")
        for i in range(300):
            client.put_object(Bucket="occ-killed", Key=f"obman/train/rgb/{i:08d}.jpg", Body=os.urandom(2000))
        command = ingest_command("occ-killed", server.endpoint_url, dest, "--workers", "1")
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fake_env()
        )
        deadline = time.monotonic() + 120
        while len(list(dest.rglob("*.jpg"))) < 20 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        server.process.kill()
        stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 1, stderr
    failed = [row for row in s3sync.load_manifest(dest).values() if row.status == FAILED]
    assert failed and all(row.error.startswith("transient ") for row in failed)
    assert leaks(stdout, stderr, manifest_text(dest)) == []


def test_listing_error_raised_to_prefect_carries_no_credentials(tmp_path, monkeypatch):
    # What the plan task raises is what Prefect logs and stores as the task run's state message.
    from tasks.ingest import only_transient, plan_ingest

    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    cfg = SyncConfig(
        source="s3://occ-bucket/obman",
        dest=tmp_path,
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        max_attempts=1,
    )
    with pytest.raises(Exception) as caught:
        plan_ingest.fn(cfg)
    text = "".join(traceback.format_exception(caught.value))
    assert "cannot list s3://occ-bucket/obman" in text
    assert leaks(text, repr(caught.value)) == []

    class FailedState:
        def result(self):
            raise caught.value

    assert only_transient(None, None, FailedState())  # still retried: a dead endpoint may come back


def test_failure_table_of_transfers_to_a_dead_endpoint_carries_no_credentials(tmp_path, monkeypatch):
    # The rows the flow's finish step publishes as its "ingest-failures" artifact.
    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    cfg = SyncConfig(
        source="s3://occ-bucket/obman",
        dest=tmp_path,
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        max_attempts=1,
        workers=2,
    )
    objects = [
        s3sync.PlannedObject(f"obman/train/{i}.jpg", 10, "0" * 32, "2026-01-01", f"train/{i}.jpg")
        for i in range(3)
    ]
    rows = s3sync.sync_objects(objects, cfg, s3sync.client_for(cfg))
    table = s3sync.failure_table(s3sync.summarize(rows, seconds=1.0))
    assert [row["reason"].split(":")[0] for row in table] == ["transient EndpointConnectionError"] * 3
    assert leaks(str(table)) == []
