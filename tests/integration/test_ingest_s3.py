"""occ ingest against a real moto S3 server process on loopback.

.venv/bin/python -m pytest tests/integration/test_ingest_s3.py -q
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from occ_core import s3sync
from occ_core.s3sync import DOWNLOADED, FAILED, REJECTED, SKIPPED, SyncConfig

pytestmark = pytest.mark.integration


def obman_like(n: int, seed: int = 0) -> dict[str, bytes]:
    """Keys under ``obman/`` in the ObMan layout, with random content of a few hundred bytes to 3 KB."""
    rng = random.Random(seed)
    objects = {}
    for i in range(n):
        split = ("train", "val", "test")[i % 3]
        folder, suffix = (("rgb", "jpg"), ("segm", "png"), ("meta", "pkl"))[i // 3 % 3]
        objects[f"obman/{split}/{folder}/{i:08d}.{suffix}"] = rng.randbytes(rng.randint(200, 3000))
    return objects


def put_all(client, bucket: str, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


def config(bucket: str, endpoint: str, dest: Path, **changes) -> SyncConfig:
    settings = {"workers": 4, "backoff_seconds": 0} | changes
    return SyncConfig(source=f"s3://{bucket}/obman", dest=dest, endpoint_url=endpoint, **settings)


def local_bytes(dest: Path, objects: dict[str, bytes]) -> dict[str, bytes | None]:
    """What the mirror holds for each key (None when missing)."""
    paths = {key: dest / key.removeprefix("obman/") for key in objects}
    return {key: path.read_bytes() if path.exists() else None for key, path in paths.items()}


@contextmanager
def counting_gets() -> Iterator[list[str]]:
    """Keys of every GET of a small object the engine sends inside the block (however it signs it)."""
    keys: list[str] = []
    real_open = s3sync._Downloader._open

    def record(downloader, key):
        keys.append(key)
        return real_open(downloader, key)

    s3sync._Downloader._open = record
    try:
        yield keys
    finally:
        s3sync._Downloader._open = real_open


@pytest.fixture
def dataset(s3_bucket, s3_client) -> dict[str, bytes]:
    objects = obman_like(30)
    put_all(s3_client, s3_bucket, objects)
    return objects


def test_full_sync_mirrors_every_split_and_records_each_object(
    s3_bucket, s3_endpoint, s3_client, dataset, tmp_path
):
    s3_client.put_object(Bucket=s3_bucket, Key="obman/README.txt", Body=b"not a split")
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror")
    report = s3sync.sync(cfg)
    assert (report.ok, report.skipped, report.failed) == (len(dataset), 0, 0)
    assert local_bytes(cfg.dest, dataset) == dataset
    assert not (cfg.dest / "README.txt").exists()
    manifest = s3sync.load_manifest(cfg.dest)
    assert {row.status for row in manifest.values()} == {DOWNLOADED}
    row = manifest["obman/val/rgb/00000001.jpg"]
    assert (row.local_path, row.size) == ("val/rgb/00000001.jpg", len(dataset[row.key]))


def test_second_sync_transfers_nothing_and_the_manifest_says_skipped(
    s3_bucket, s3_endpoint, dataset, tmp_path
):
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror")
    s3sync.sync(cfg)
    with counting_gets() as gets:
        report = s3sync.sync(cfg)
    assert gets == []
    assert (report.ok, report.skipped) == (0, len(dataset))
    assert {row.status for row in s3sync.load_manifest(cfg.dest).values()} == {SKIPPED}


def test_include_mirrors_extra_top_level_folders(s3_bucket, s3_endpoint, s3_client, tmp_path):
    s3_client.put_object(Bucket=s3_bucket, Key="obman/shapenet/02876657/a/model.obj", Body=b"v 0 0 0")
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror", include=["shapenet"])
    s3sync.sync(cfg)
    assert (cfg.dest / "shapenet/02876657/a/model.obj").read_bytes() == b"v 0 0 0"


def test_killed_sync_leaves_only_complete_files_and_the_rerun_resumes(
    s3_bucket, s3_endpoint, s3_client, tmp_path
):
    objects = obman_like(240, seed=1)
    put_all(s3_client, s3_bucket, objects)
    dest = tmp_path / "mirror"
    command = [sys.executable, "-m", "occ_core.s3sync", f"s3://{s3_bucket}/obman", "--dest", str(dest)]
    command += ["--endpoint-url", s3_endpoint, "--workers", "1", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while sum(1 for _ in dest.rglob("*.jpg")) < 20 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    held = {key: data for key, data in local_bytes(dest, objects).items() if data is not None}
    assert 20 <= len(held) < len(objects)
    assert all(data == objects[key] for key, data in held.items())
    with counting_gets() as gets:
        report = s3sync.sync(config(s3_bucket, s3_endpoint, dest))
    assert report.failed == 0 and report.ok + report.skipped == len(objects)
    assert len(gets) <= len(objects) - len(held)
    assert local_bytes(dest, objects) == objects
    assert not [path for path in dest.rglob("*.tmp")]


def test_interrupted_sync_resumes_from_its_checkpoint(
    s3_bucket, s3_endpoint, s3_client, tmp_path, monkeypatch
):
    objects = obman_like(60, seed=2)
    put_all(s3_client, s3_bucket, objects)
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror", workers=1, checkpoint_seconds=0.01)
    real_open = s3sync._Downloader._open
    calls = 0

    def interrupt_after_20(downloader, key):
        nonlocal calls
        calls += 1
        if calls > 20:
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM, in the CLI) raises
        return real_open(downloader, key)

    monkeypatch.setattr(s3sync._Downloader, "_open", interrupt_after_20)
    with pytest.raises(KeyboardInterrupt):
        s3sync.sync(cfg)
    monkeypatch.undo()

    checkpointed = [row for row in s3sync.load_manifest(cfg.dest).values() if row.status == DOWNLOADED]
    assert 1 <= len(checkpointed) <= 20
    with counting_gets() as gets:
        report = s3sync.sync(cfg)
    assert report.failed == 0 and report.skipped >= 20
    assert len(gets) == report.ok == len(objects) - report.skipped
    assert local_bytes(cfg.dest, objects) == objects
    assert not list((cfg.dest / s3sync.CHECKPOINT_DIR).glob("*.parquet"))


def test_truncated_local_file_is_fetched_again(s3_bucket, s3_endpoint, dataset, tmp_path):
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror")
    s3sync.sync(cfg)
    damaged = cfg.dest / "train/rgb/00000000.jpg"
    damaged.write_bytes(damaged.read_bytes()[:10])
    report = s3sync.sync(cfg)
    assert (report.ok, report.skipped) == (1, len(dataset) - 1)
    assert damaged.read_bytes() == dataset["obman/train/rgb/00000000.jpg"]


def test_same_size_corruption_is_fetched_again_only_with_verify(s3_bucket, s3_endpoint, dataset, tmp_path):
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror")
    s3sync.sync(cfg)
    damaged = cfg.dest / "train/rgb/00000000.jpg"
    damaged.write_bytes(bytes(len(damaged.read_bytes())))
    assert s3sync.sync(cfg).ok == 0  # size and ETag still match: documented blind spot
    report = s3sync.sync(config(s3_bucket, s3_endpoint, cfg.dest, verify=True))
    assert (report.ok, report.skipped) == (1, len(dataset) - 1)
    assert damaged.read_bytes() == dataset["obman/train/rgb/00000000.jpg"]


@pytest.mark.parametrize(
    "bad_key", ["obman/train/../../evil", "obman/train//etc/evil", "obman/train/a\\..\\..\\evil"]
)
def test_traversal_key_is_rejected_and_reported_while_the_rest_syncs(
    s3_bucket, s3_endpoint, s3_client, tmp_path, bad_key
):
    s3_client.put_object(Bucket=s3_bucket, Key="obman/train/rgb/00000000.jpg", Body=b"fine")
    s3_client.put_object(Bucket=s3_bucket, Key=bad_key, Body=b"escape")
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "deep" / "mirror")
    report = s3sync.sync(cfg)
    assert (report.ok, report.failed, report.extra["rejected"]) == (1, 1, 1)
    assert [path.name for path in tmp_path.rglob("*evil*")] == []
    assert s3sync.load_manifest(cfg.dest)[bad_key].status == REJECTED


def test_object_gone_after_listing_fails_without_retries(
    s3_bucket, s3_endpoint, s3_client, dataset, tmp_path, monkeypatch
):
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror", max_attempts=5)
    plan = s3sync.plan_sync(cfg, s3sync.client_for(cfg))
    gone = "obman/val/rgb/00000001.jpg"
    s3_client.delete_object(Bucket=s3_bucket, Key=gone)
    retries = []
    monkeypatch.setattr(s3sync, "backoff_delay", lambda *args, **kwargs: retries.append(args) or 0.0)
    rows = s3sync.sync_objects(plan.objects, cfg, s3sync.client_for(cfg))
    failed = [row for row in rows if row.status == FAILED]
    assert [row.key for row in failed] == [gone]
    assert failed[0].error.startswith("permanent NoSuchKey")
    assert retries == []


def test_object_above_the_multipart_threshold_downloads_in_parts(s3_bucket, s3_endpoint, s3_client, tmp_path):
    data = random.Random(3).randbytes(6 * 1024 * 1024)
    s3_client.put_object(Bucket=s3_bucket, Key="obman/train/meta/big.pkl", Body=data)
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror", multipart_threshold=5 * 1024 * 1024)
    report = s3sync.sync(cfg)
    assert report.ok == 1
    assert (cfg.dest / "train/meta/big.pkl").read_bytes() == data


def test_command_prints_the_summary_and_exits_nonzero_when_a_key_is_rejected(
    s3_bucket, s3_endpoint, s3_client, tmp_path
):
    for split in ("train", "test"):
        s3_client.put_object(Bucket=s3_bucket, Key=f"obman/{split}/rgb/00000000.jpg", Body=b"fine")
    command = [sys.executable, "-m", "occ_core.s3sync", f"s3://{s3_bucket}/obman", "--dest", str(tmp_path)]
    command += ["--endpoint-url", s3_endpoint, "--splits", "train,test"]
    ok = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "2 downloaded" in ok.stdout and str(tmp_path / s3sync.MANIFEST_NAME) in ok.stdout
    s3_client.put_object(Bucket=s3_bucket, Key="obman/test/../../evil", Body=b"escape")
    rejected = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=120)
    assert rejected.returncode == 1
    assert "obman/test/../../evil" in rejected.stdout


@pytest.mark.parametrize(
    ("source", "splits", "message"),
    [
        (
            "obman-typo",
            "train,val",
            "no objects under {bucket}/obman-typo/train/, {bucket}/obman-typo/val/ "
            "(objects listed: train 0, val 0)",
        ),
        ("obman", "train,test", "no objects under {bucket}/obman/test/ (objects listed: train 1, test 0)"),
    ],
    ids=["empty-prefix", "empty-split"],
)
def test_command_exits_nonzero_naming_a_prefix_or_split_without_objects(
    s3_bucket, s3_endpoint, s3_client, tmp_path, source, splits, message
):
    s3_client.put_object(Bucket=s3_bucket, Key="obman/train/rgb/00000000.jpg", Body=b"fine")
    command = [sys.executable, "-m", "occ_core.s3sync", f"s3://{s3_bucket}/{source}", "--dest", str(tmp_path)]
    command += ["--endpoint-url", s3_endpoint, "--splits", splits]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: " + message.format(bucket=f"s3://{s3_bucket}")


def test_listing_reads_keys_with_spaces_plus_signs_and_unicode_as_botocore_does(
    s3_bucket, s3_endpoint, s3_client, tmp_path
):
    keys = ["obman/train/rgb/a b+c.jpg", "obman/train/rgb/ü%41&<x>.jpg", "obman/val/meta/00000001.pkl"]
    for key in keys:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror")
    listed = s3sync.list_objects(s3sync.client_for(cfg), cfg)
    regular = [
        item
        for prefix in ("obman/train/", "obman/val/")
        for item in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]
    ]
    fields = ("Key", "Size", "ETag", "LastModified")
    assert [{name: item[name] for name in fields} for item in listed] == [
        {name: item[name] for name in fields} for item in regular
    ]


def test_listing_a_missing_bucket_raises_the_typed_error(s3_endpoint, tmp_path):
    from botocore.exceptions import ClientError

    cfg = config("occ-no-such-bucket", s3_endpoint, tmp_path / "mirror")
    with pytest.raises(ClientError, match="NoSuchBucket"):
        s3sync.list_objects(s3sync.client_for(cfg), cfg)


def test_embedded_server_keeps_connections_open_after_bodiless_requests_only(s3_bucket, s3_endpoint):
    import http.client

    host, port = s3_endpoint.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        statuses = []
        for _ in range(2):  # the second request would hang if the server drained the connection
            connection.request("GET", f"/{s3_bucket}?list-type=2")
            response = connection.getresponse()
            response.read()
            statuses.append((response.status, response.getheader("Connection")))
        assert statuses == [(200, None), (200, None)]
        connection.request("PUT", f"/{s3_bucket}/obman/train/x", body=b"data")
        response = connection.getresponse()
        response.read()
        assert (response.status, response.getheader("Connection")) == (200, "close")
    finally:
        connection.close()


def test_directly_presigned_gets_are_accepted_and_only_the_probe_goes_through_the_client(
    s3_bucket, s3_endpoint, dataset, tmp_path
):
    cfg = config(s3_bucket, s3_endpoint, tmp_path / "mirror")
    through_client: list[str] = []
    events = s3sync.client_for(cfg).meta.events

    def record(params, **kwargs):
        through_client.append(params["Key"])

    events.register("before-parameter-build.s3.GetObject", record)
    try:
        report = s3sync.sync(cfg)
    finally:
        events.unregister("before-parameter-build.s3.GetObject", record)
    assert report.ok == len(dataset) and through_client == [s3sync.PresignedGets._PROBE_KEY]
    assert local_bytes(cfg.dest, dataset) == dataset
