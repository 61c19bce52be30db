"""occ_core.s3sync without a server: key -> path rules, error classes, retries, skip logic, manifest.

.venv/bin/python -m pytest tests/unit/test_s3sync.py -q
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import random
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from pydantic import ValidationError

from occ_core import s3sync
from occ_core.errors import BadSample
from occ_core.s3sync import (
    DOWNLOADED,
    FAILED,
    REJECTED,
    SKIPPED,
    ChecksumMismatch,
    IncompleteShard,
    ManifestRow,
    PlannedObject,
    SyncConfig,
    SyncPlan,
)

NOW = "2026-01-01T00:00:00+00:00"


def client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def planned(key: str = "obman/train/rgb/00000001.jpg", data: bytes = b"pixels", **changes) -> PlannedObject:
    obj = PlannedObject(key, len(data), md5(data), NOW, key.removeprefix("obman/"))
    return dataclasses.replace(obj, **changes)


def manifest_row(obj: PlannedObject, data: bytes, status: str = DOWNLOADED) -> ManifestRow:
    return ManifestRow(obj.key, obj.size, obj.etag, hashlib.sha256(data).hexdigest(), obj.local_path, status)


def put_local(root: Path, obj: PlannedObject, data: bytes) -> Path:
    path = root / obj.local_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- source URI and key -> path -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://data/obman", ("data", "obman/")),
        ("s3://data/a/b/", ("data", "a/b/")),
        ("s3://data", ("data", "")),
    ],
)
def test_s3_uri_splits_into_bucket_and_slash_terminated_prefix(uri, expected):
    assert s3sync.parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["http://data/obman", "s3:///obman", "data/obman"])
def test_malformed_source_is_refused_by_the_config(uri, tmp_path):
    with pytest.raises(ValidationError, match="s3://"):
        SyncConfig(source=uri, dest=tmp_path, workers=1)


def test_key_maps_to_the_same_relative_path_under_root():
    assert s3sync.relative_path_for("obman/train/rgb/00000001.jpg", "obman/") == "train/rgb/00000001.jpg"
    assert s3sync.relative_path_for("train/meta/00000001.pkl", "") == "train/meta/00000001.pkl"


@pytest.mark.parametrize(
    "key",
    [
        "obman/train/../../evil",
        "obman/train/../val/x.jpg",
        "obman/train//etc/passwd",
        "obman//train/x.jpg",
        "obman/train/./x.jpg",
        "obman/train/a\\..\\..\\evil",
        "obman/train/x\0.jpg",
        "elsewhere/train/x.jpg",
    ],
)
def test_key_that_could_leave_root_is_rejected_naming_the_key(key):
    with pytest.raises(BadSample) as caught:
        s3sync.relative_path_for(key, "obman/")
    assert caught.value.path == key


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--splits", "train,../x", "split must be a name"),
        ("--splits", "a/b", "split must be a name"),
        ("--endpoint-url", "notaurl", "http:// or https:// URL"),
        ("--endpoint-url", "ftp://127.0.0.1:9000", "http:// or https:// URL"),
        ("--workers", "0", "greater than or equal to 1"),
    ],
)
def test_bad_option_is_a_one_line_usage_error_naming_the_option(tmp_path, option, value, words):
    from click.testing import CliRunner

    result = CliRunner().invoke(s3sync.cli, ["s3://b/obman", "--dest", str(tmp_path), option, value])
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error_lines == [f"Error: invalid value for {option}: {error_lines[0].split(': ', 2)[2]}"]
    assert words in error_lines[0] and "Traceback" not in result.output


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:9000", "https://s3.example.com", "http://[::1]:9000/"]
)
def test_http_endpoints_are_accepted(endpoint, tmp_path):
    assert (
        SyncConfig(source="s3://b/p", dest=tmp_path, endpoint_url=endpoint, workers=1).endpoint_url
        == endpoint
    )


def test_folders_are_the_splits_then_the_extra_folders_without_repeats(tmp_path):
    cfg = SyncConfig(
        source="s3://b/p", dest=tmp_path, splits=["train", "test"], include=["shapenet", "train"], workers=1
    )
    assert cfg.folders == ("train", "test", "shapenet")


# --- transient or permanent -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        client_error(500, "InternalError"),
        client_error(503, "SlowDown"),
        client_error(429, "TooManyRequests"),
        client_error(400, "RequestTimeout"),
        client_error(400, "ThrottlingException"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
        IncompleteShard("2 objects failed transiently"),
    ],
    ids=repr,
)
def test_server_errors_throttling_and_dropped_connections_are_transient(exc):
    assert s3sync.is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        client_error(403, "AccessDenied"),
        client_error(404, "NoSuchKey"),
        client_error(404, "NoSuchBucket"),
        client_error(400, "InvalidBucketName"),
        ChecksumMismatch("k: MD5 differs"),
        OSError(errno.ENOSPC, "No space left on device"),
        BadSample("k", "bad"),
    ],
    ids=repr,
)
def test_client_errors_checksums_and_local_errors_are_permanent(exc):
    assert not s3sync.is_transient(exc)


# --- retries --------------------------------------------------------------------------------------


class Flaky:
    """Raises the given errors in turn, then returns 'ok'."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_transient_errors_are_retried_until_success():
    fn = Flaky(client_error(503, "SlowDown"), EndpointConnectionError(endpoint_url="x"))
    assert s3sync.call_with_retries(fn, max_attempts=5, base_delay=0) == "ok"
    assert fn.calls == 3


@pytest.mark.parametrize("status_code", [(403, "AccessDenied"), (404, "NoSuchKey")])
def test_permanent_error_is_raised_after_one_call(status_code):
    fn = Flaky(client_error(*status_code))
    with pytest.raises(ClientError):
        s3sync.call_with_retries(fn, max_attempts=5, base_delay=0)
    assert fn.calls == 1


def test_checksum_mismatch_is_retried_then_raised_when_attempts_run_out():
    fn = Flaky(*[ChecksumMismatch("k")] * 3)
    with pytest.raises(ChecksumMismatch):
        s3sync.call_with_retries(fn, max_attempts=3, base_delay=0)
    assert fn.calls == 3


def test_backoff_is_jittered_below_an_exponential_ceiling():
    rng = random.Random(0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (10, 20.0)]:
        delays = [s3sync.backoff_delay(attempt, 0.5, cap=20.0, rng=rng) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > ceiling / 2  # spread out, not a fixed delay


# --- what counts as already in place -----------------------------------------------------------------


def test_object_matching_manifest_and_local_file_is_skipped_with_stored_hash(tmp_path):
    obj = planned(etag="0" * 32 + "-2")  # a multipart ETag: only the manifest can vouch for the file
    obj = dataclasses.replace(obj, known=manifest_row(obj, b"pixels"))
    put_local(tmp_path, obj, b"pixels")
    row = s3sync.settled_row(obj, tmp_path, verify=False, now=NOW)
    assert (row.status, row.sha256) == (SKIPPED, obj.known.sha256)


def test_missing_local_file_is_fetched(tmp_path):
    obj = planned()
    obj = dataclasses.replace(obj, known=manifest_row(obj, b"pixels"))
    assert s3sync.settled_row(obj, tmp_path, verify=False, now=NOW) is None


def test_local_file_of_another_size_is_fetched(tmp_path):
    obj = planned()
    obj = dataclasses.replace(obj, known=manifest_row(obj, b"pixels"))
    put_local(tmp_path, obj, b"pix")
    assert s3sync.settled_row(obj, tmp_path, verify=False, now=NOW) is None


def test_remote_object_with_a_new_etag_is_fetched(tmp_path):
    old = planned(data=b"pixels")
    new = dataclasses.replace(planned(data=b"PIXELS"), known=manifest_row(old, b"pixels"))
    put_local(tmp_path, new, b"pixels")
    assert s3sync.settled_row(new, tmp_path, verify=False, now=NOW) is None


def test_manifest_row_of_a_failed_download_does_not_count(tmp_path):
    obj = planned(etag="0" * 32 + "-2")
    obj = dataclasses.replace(obj, known=dataclasses.replace(manifest_row(obj, b"pixels"), status=FAILED))
    put_local(tmp_path, obj, b"pixels")
    assert s3sync.settled_row(obj, tmp_path, verify=False, now=NOW) is None


def test_file_unknown_to_the_manifest_is_adopted_when_its_md5_is_the_etag(tmp_path):
    obj = planned()
    put_local(tmp_path, obj, b"pixels")
    row = s3sync.settled_row(obj, tmp_path, verify=False, now=NOW)
    assert (row.status, row.sha256) == (SKIPPED, hashlib.sha256(b"pixels").hexdigest())


def test_file_unknown_to_the_manifest_with_other_content_is_fetched(tmp_path):
    obj = planned()
    put_local(tmp_path, obj, b"PIXELS")
    assert s3sync.settled_row(obj, tmp_path, verify=False, now=NOW) is None


def test_same_size_corruption_passes_without_verify_and_is_caught_with_it(tmp_path):
    obj = planned()
    obj = dataclasses.replace(obj, known=manifest_row(obj, b"pixels"))
    put_local(tmp_path, obj, b"PIXELS")
    assert s3sync.settled_row(obj, tmp_path, verify=False, now=NOW).status == SKIPPED
    assert s3sync.settled_row(obj, tmp_path, verify=True, now=NOW) is None


def test_rejected_key_is_settled_as_rejected_with_its_reason(tmp_path):
    obj = planned(key="obman/train/../../evil", local_path=None, reject_reason="would resolve outside ROOT")
    row = s3sync.settled_row(obj, tmp_path, verify=False, now=NOW)
    assert (row.status, row.error, row.local_path) == (REJECTED, "would resolve outside ROOT", None)


# --- manifest --------------------------------------------------------------------------------------


def rows(*names: str, status: str = DOWNLOADED) -> list[ManifestRow]:
    return [
        ManifestRow(f"p/train/{n}", 3, md5(n.encode()), "ab" * 32, f"train/{n}", status, None, NOW, NOW)
        for n in names
    ]


def test_manifest_round_trips_every_column(tmp_path):
    written = rows("a", "b") + [ManifestRow("p/train/../x", 1, "e", None, None, REJECTED, "outside ROOT")]
    s3sync.write_manifest(tmp_path, written)
    assert s3sync.load_manifest(tmp_path) == {row.key: row for row in written}


def test_manifest_keeps_rows_of_keys_not_listed_this_time(tmp_path):
    s3sync.write_manifest(tmp_path, rows("a", "b"))
    s3sync.write_manifest(tmp_path, rows("b", status=SKIPPED))
    loaded = s3sync.load_manifest(tmp_path)
    assert {key: row.status for key, row in loaded.items()} == {"p/train/a": DOWNLOADED, "p/train/b": SKIPPED}


def test_checkpoint_of_an_interrupted_run_is_read_then_folded_into_the_manifest(tmp_path):
    s3sync.write_manifest(tmp_path, rows("a", status=FAILED))
    checkpoint = s3sync.Checkpoint(tmp_path, "cli-1", interval=3600)
    for row in rows("a", "b"):
        checkpoint.add(row)
    checkpoint.flush()
    assert {row.status for row in s3sync.load_manifest(tmp_path).values()} == {DOWNLOADED}
    s3sync.write_manifest(tmp_path, [])
    assert not list((tmp_path / s3sync.CHECKPOINT_DIR).glob("*.parquet"))
    assert set(s3sync.load_manifest(tmp_path)) == {"p/train/a", "p/train/b"}


def test_stale_temporary_files_are_removed_and_real_files_kept(tmp_path):
    obj = planned()
    real = put_local(tmp_path, obj, b"pixels")
    stale = real.with_name(f".{real.name}.0123abcd.tmp")
    stale.write_bytes(b"pix")
    assert s3sync.remove_stale_temp_files(tmp_path, [obj]) == 1
    assert real.exists() and not stale.exists()


# --- summary and shards -------------------------------------------------------------------------------


def test_summary_counts_rejected_keys_as_failed_and_sums_downloaded_bytes():
    settled = (
        rows("a", "b")
        + rows("c", status=SKIPPED)
        + [ManifestRow("p/../x", 1, "e", None, None, REJECTED, "out")]
    )
    report = s3sync.summarize(settled, seconds=2.0)
    assert (report.ok, report.skipped, report.failed) == (2, 1, 1)
    assert (report.extra["objects"], report.extra["bytes"], report.extra["rejected"]) == (4, 6, 1)
    assert report.quarantined[0].sample_id == "p/../x"


def test_folder_counts_name_each_configured_folder_and_an_empty_one_is_refused(tmp_path):
    cfg = SyncConfig(source="s3://b/obman", dest=tmp_path, include=["shapenet"], workers=1)
    keys = ["obman/train/a", "obman/train/b", "obman/val/c", "obman/other/d"]
    listed = [ManifestRow(key, 1, "e", None, key[6:], DOWNLOADED) for key in keys]
    report = s3sync.finish_sync(cfg, listed, started=0.0)
    assert report.extra["objects_by_folder"] == {"train": 2, "val": 1, "test": 0, "shapenet": 0}
    with pytest.raises(ValueError) as caught:
        s3sync.check_not_empty(report, cfg)
    assert str(caught.value) == (
        "no objects under s3://b/obman/test/, s3://b/obman/shapenet/ "
        "(objects listed: train 2, val 1, test 0, shapenet 0)"
    )


def test_failed_row_names_the_error_without_the_clients_credentials(monkeypatch):
    client = presigning_client(monkeypatch)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # known from the client only, as with a profile
    url = s3sync.PresignedGets(client, "occ-bucket").request(PRESIGN_KEYS[0]).url
    assert "AKIDCHAIN" in url
    row = s3sync._failed_row(planned(), EndpointConnectionError(endpoint_url=url), NOW, client)
    assert row.error.startswith("transient EndpointConnectionError: Could not connect")
    assert "AKIDCHAIN" not in row.error and "Signature" not in row.error


def test_plan_cuts_consecutive_shards_of_at_most_shard_size():
    plan = SyncPlan([planned(key=f"obman/train/{i}") for i in range(5)], started=0.0)
    assert [[obj.key[-1] for obj in shard] for shard in plan.shards(2)] == [["0", "1"], ["2", "3"], ["4"]]


def sync_shard_failing_with(error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[ManifestRow]:
    failed = ManifestRow("obman/train/a", 1, "e", None, "train/a", FAILED, error)
    monkeypatch.setattr(s3sync, "client_for", lambda cfg: None)
    monkeypatch.setattr(s3sync, "sync_objects", lambda *args, **kwargs: [failed])
    return s3sync.sync_shard([], SyncConfig(source="s3://b/obman", dest=tmp_path, workers=1), "shard-00000")


def test_shard_with_a_transient_failure_raises_so_prefect_retries_it(tmp_path, monkeypatch):
    with pytest.raises(IncompleteShard):
        sync_shard_failing_with("transient ReadTimeoutError: slow", tmp_path, monkeypatch)


def test_shard_with_only_permanent_failures_returns_its_rows(tmp_path, monkeypatch):
    rows = sync_shard_failing_with("permanent NoSuchKey: gone", tmp_path, monkeypatch)
    assert [row.status for row in rows] == [FAILED]


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-30T01:16:53.000Z",
        "2026-11-30T01:16:53Z",
        "2026-11-30T01:16:53",
        "2026-11-30T01:16:53.123456+02:00",
        "Mon, 30 Nov 2026 01:16:53 GMT",
        1764465413,
    ],
)
def test_embedded_server_timestamps_serialize_as_moto_would(value, monkeypatch):
    import moto.core.serialize
    from botocore.utils import parse_to_aware_datetime

    from occ_core.s3server import _fast_timestamps

    # Restored after the test: the patch is meant for the server process only.
    monkeypatch.setattr(moto.core.serialize, "parse_to_aware_datetime", parse_to_aware_datetime)
    _fast_timestamps()
    fast = moto.core.serialize.parse_to_aware_datetime(value)
    slow = parse_to_aware_datetime(value)
    serializer = moto.core.serialize.TimestampSerializer("iso8601")
    for form in ("iso8601", "rfc822", "unixtimestamp"):
        to_text = getattr(serializer, f"_timestamp_{form}")
        assert to_text(fast) == to_text(slow)


def test_listing_page_is_read_like_botocore_reads_it():
    xml = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>p/train/</Prefix><KeyCount>2</KeyCount><EncodingType>url</EncodingType>
  <IsTruncated>true</IsTruncated><NextContinuationToken>tok+en/=</NextContinuationToken>
  <Contents><Key>p/train/a%20b%2Bc.png</Key><LastModified>2026-01-02T03:04:05.000Z</LastModified>
    <ETag>&quot;0123456789abcdef0123456789abcdef&quot;</ETag><Size>42</Size><StorageClass>STANDARD</StorageClass>
  </Contents>
  <Contents><Key>p/train/x+y</Key><LastModified>2026-01-02T03:04:06Z</LastModified>
    <ETag>&quot;abc-2&quot;</ETag><Size>7</Size></Contents>
</ListBucketResult>"""
    page = s3sync.parse_listing_page(xml)
    assert page["IsTruncated"] and page["NextContinuationToken"] == "tok+en/="
    first, second = page["Contents"]
    assert (first["Key"], first["Size"], first["ETag"]) == (
        "p/train/a b+c.png",
        42,
        '"0123456789abcdef0123456789abcdef"',
    )
    assert first["LastModified"].isoformat() == "2026-01-02T03:04:05+00:00"
    assert second["Key"] == "p/train/x y"  # botocore decodes url-encoded listings with unquote_plus


def test_last_listing_page_has_no_continuation_token():
    xml = b"""<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <IsTruncated>false</IsTruncated></ListBucketResult>"""
    assert s3sync.parse_listing_page(xml) == {"Contents": [], "IsTruncated": False}


def presigning_client(monkeypatch, region: str = "us-east-1", endpoint: str | None = None, **config):
    import botocore.session
    from botocore.config import Config

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDCHAIN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-the-chain")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    session = botocore.session.Session()
    return session.create_client("s3", region_name=region, endpoint_url=endpoint, config=Config(**config))


def freeze_signing_clock(monkeypatch) -> None:
    import datetime
    import time

    import botocore.auth

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    frozen = datetime.datetime(2026, 11, 30, 1, 2, 3)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *args, **kwargs: frozen)


PRESIGN_KEYS = ["obman/train/rgb/00000001.jpg", "obman/train/rgb/a b+c~d.jpg", "obman/val/ü%41&<x>.pkl"]


@pytest.mark.parametrize(
    ("region", "endpoint", "config", "scheme"),
    [
        ("us-east-1", "http://127.0.0.1:5000", {"s3": {"addressing_style": "path"}}, "v2"),
        ("eu-west-1", "http://127.0.0.1:5000", {"signature_version": "s3v4"}, "v4"),
        ("eu-west-1", None, {"signature_version": "s3v4", "s3": {"addressing_style": "virtual"}}, "v4"),
        ("us-west-2", None, {}, "v2"),
    ],
)
def test_direct_presign_equals_the_clients_presign_at_the_same_time(
    monkeypatch, region, endpoint, config, scheme
):
    client = presigning_client(monkeypatch, region, endpoint, **config)
    freeze_signing_clock(monkeypatch)
    presigned = s3sync.PresignedGets(client, "occ-bucket")
    assert presigned.scheme == scheme
    for key in PRESIGN_KEYS:
        expected = client.generate_presigned_url("get_object", Params={"Bucket": "occ-bucket", "Key": key})
        assert presigned.request(key).url == expected


def test_direct_presign_uses_the_credential_chains_keys_and_session_token(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-from-the-chain")
    client = presigning_client(monkeypatch, signature_version="s3v4")
    freeze_signing_clock(monkeypatch)
    url = s3sync.PresignedGets(client, "occ-bucket").request(PRESIGN_KEYS[0]).url
    assert "X-Amz-Credential=AKIDCHAIN%2F" in url and "X-Amz-Security-Token=token-from-the-chain" in url
    assert url == client.generate_presigned_url(
        "get_object", Params={"Bucket": "occ-bucket", "Key": PRESIGN_KEYS[0]}
    )


def test_unsigned_client_gets_plain_urls(monkeypatch):
    from botocore import UNSIGNED

    client = presigning_client(monkeypatch, signature_version=UNSIGNED)
    presigned = s3sync.PresignedGets(client, "occ-bucket")
    assert presigned.scheme == "unsigned"
    for key in PRESIGN_KEYS:
        expected = client.generate_presigned_url("get_object", Params={"Bucket": "occ-bucket", "Key": key})
        assert presigned.request(key).url == expected


def test_presign_of_another_form_is_left_to_the_client_per_key(monkeypatch):
    client = presigning_client(monkeypatch)
    real = client.generate_presigned_url

    def with_extra_parameter(operation, Params):
        return real(operation, Params=Params) + "&x-extra=1"

    monkeypatch.setattr(client, "generate_presigned_url", with_extra_parameter)
    presigned = s3sync.PresignedGets(client, "occ-bucket")
    assert presigned.scheme is None
    assert presigned.request(PRESIGN_KEYS[0]).url.endswith("&x-extra=1")
