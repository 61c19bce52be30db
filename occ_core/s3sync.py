"""Mirror ObMan splits from S3 into a local root; a Parquet manifest makes a re-run a no-op.

Run it:

    occ ingest s3://BUCKET/PREFIX --dest ROOT [--splits train,val,test] [--endpoint-url URL]
        [--no-sign-request]
    python -m occ_core.s3sync s3://BUCKET/PREFIX --dest ROOT

``PREFIX/{split}/...`` lands in ``ROOT/{split}/...`` (plus any ``--include`` folders). Per object:

- skipped only when the manifest row and the local file agree with the listing: same size, same
  ETag, and the file at its place with that size (``--verify`` also re-hashes it against the stored
  SHA-256). A file the manifest does not know (a run killed between checkpoints) is adopted only when
  its MD5 equals a plain-MD5 ETag; otherwise it is fetched again;
- downloaded to a temporary sibling, checked (size; MD5 where the ETag is a plain MD5), then renamed
  into place: a file under its final name is always complete;
- transient errors (5xx, throttling, timeouts, dropped connections) are retried with exponential
  backoff and full jitter; permanent ones (403, 404, ...) are recorded once and not retried;
- a key whose relative part would leave ROOT is rejected, recorded and counted as failed;
- no error text carries credentials: every error becomes text through ``describe_error``, which drops
  the signature, key id and token of presigned URLs and blanks the active credentials
  (occ_core.redact); the command also redacts log records (``occ -vv``);
- the command exits 1, after its summary, when a configured folder listed no objects.

The manifest ``ROOT/.occ-manifest.parquet`` has one row per key (key, size, etag, sha256, local_path
relative to ROOT, status, error, last_modified, synced_at); checkpoints under ``ROOT/.occ-manifest.d/``
are written every few seconds during a run and folded into it at the end, so an interrupted run
resumes where it stopped. Same-size corruption of a local file is invisible to size and ETag: only
``--verify`` catches it.

The command is timed against ``aws s3 sync`` (benchmarks/ingest.py), so botocore, pyarrow and tqdm
are imported by the functions that use them, and listing overlaps with loading the manifest.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ConfigDict, Field, field_validator

from occ_core.errors import BadSample
from occ_core.fsio import CHUNK, atomic_path
from occ_core.redact import redact, redact_logs
from occ_core.splits import SplitName
from occ_core.stage import StageReport

MANIFEST_NAME = ".occ-manifest.parquet"
CHECKPOINT_DIR = ".occ-manifest.d"
DOWNLOADED, SKIPPED, FAILED, REJECTED = "downloaded", "skipped", "failed", "rejected"
_PRESENT = frozenset({DOWNLOADED, SKIPPED})  # statuses that mean "the file is in place"
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
# Error codes that say "try again later" whatever their HTTP status.
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "SlowDown",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "EC2ThrottledException",
        "InternalError",
        "ServiceUnavailable",
    }
)
T = TypeVar("T")


def _default_workers() -> int:
    from occ_core.config import get_settings

    return get_settings().workers


class SyncConfig(BaseModel):
    """What to mirror from S3, where to, and how hard to try."""

    model_config = ConfigDict(frozen=True)

    source: str = Field(description="s3://BUCKET/PREFIX holding PREFIX/{split}/...")
    dest: Path = Field(description="local root: PREFIX/{split}/... lands in ROOT/{split}/...")
    splits: tuple[SplitName, ...] = Field(("train", "val", "test"), description="split folders to mirror")
    include: tuple[str, ...] = Field(
        (), description="extra top-level folders to mirror besides the splits (e.g. shapenet)"
    )
    endpoint_url: str | None = Field(
        None, description="S3 endpoint URL (else AWS_ENDPOINT_URL, else AWS); path-style addressing"
    )
    no_sign_request: bool = Field(False, description="send unsigned requests (public buckets)")
    region: str | None = Field(None, description="AWS region (else the standard AWS configuration chain)")
    profile: str | None = Field(None, description="AWS profile from the shared config files")
    workers: int = Field(default_factory=_default_workers, ge=1, description="concurrent transfers")
    shard_size: int = Field(500, ge=1, description="keys per Prefect task in the ingest flow")
    max_attempts: int = Field(5, ge=1, description="tries per request before an error counts as final")
    backoff_seconds: float = Field(
        0.2, ge=0, description="first retry delay cap in seconds; doubles per try, with full jitter"
    )
    verify: bool = Field(
        False, description="re-hash local files against the manifest SHA-256 before skipping"
    )
    multipart_threshold: int = Field(
        8 * 1024 * 1024, ge=5 * 1024 * 1024, description="objects larger than this (bytes) download in parts"
    )
    checkpoint_seconds: float = Field(
        5.0, gt=0, description="seconds between manifest checkpoints during a run"
    )

    @field_validator("source")
    @classmethod
    def _is_s3_uri(cls, value: str) -> str:
        parse_s3_uri(value)
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _is_endpoint_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_endpoint_url(value)
        return value

    @property
    def bucket(self) -> str:
        return parse_s3_uri(self.source)[0]

    @property
    def prefix(self) -> str:
        return parse_s3_uri(self.source)[1]

    @property
    def folders(self) -> tuple[str, ...]:
        """Top-level folders to mirror: the splits, then the extra ones."""
        return tuple(dict.fromkeys((*self.splits, *self.include)))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix/")`` (prefix empty or ending in /).

    Raises:
        ValueError: Not an s3:// URI, or no bucket.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def check_endpoint_url(url: str) -> str:
    """Return ``url`` when botocore can send requests to it: ``http(s)://host[:port][/path]``.

    Raises:
        ValueError: Another scheme, or no valid host name (botocore would raise deep in client setup).
    """
    from urllib.parse import urlsplit

    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https") or not (is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url)):
        raise ValueError(f"expected an http:// or https:// URL with a host name, got {url!r}")
    return url


def relative_path_for(key: str, prefix: str) -> str:
    """The local path, relative to ROOT, of ``key`` under ``prefix`` (which is empty or ends in /).

    Parts that are all non-empty names (no ``.``, ``..``, separators) cannot climb out of ROOT, so
    ``os.path.join(ROOT, result)`` always stays below ROOT.

    Raises:
        BadSample: The key is outside the prefix, or its relative part could leave ROOT (``..`` or
            ``.`` parts, empty parts such as a leading or doubled ``/``, backslashes, NUL bytes).
    """
    if not key.startswith(prefix):
        raise BadSample(key, f"key is not under prefix {prefix!r}")
    relative = key[len(prefix) :]
    if "\\" in relative or "\0" in relative:
        raise BadSample(key, "key has a backslash or NUL byte")
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadSample(key, "key has an empty, '.' or '..' path part and would resolve outside ROOT")
    return relative


def is_transient(exc: BaseException) -> bool:
    """True for errors that may pass on a retry: S3 5xx, throttling, timeouts, dropped connections.

    False for everything else: 403/404 and other 4xx, bad input, local disk errors, and a checksum
    mismatch (the engine raises ``ChecksumMismatch`` only after its own retries are spent).
    """
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, ResponseStreamingError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, IncompleteShard):
        return True
    if isinstance(exc, S3RequestFailed):
        return exc.transient
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error.get("Code") in _TRANSIENT_CODES
    if isinstance(exc, BotoConnectionError | HTTPClientError | ResponseStreamingError | IncompleteReadError):
        return True
    # Builtin ConnectionError and TimeoutError are OSErrors too; other OSErrors are local and final.
    return isinstance(exc, ConnectionError | TimeoutError)


class ChecksumMismatch(Exception):
    """A downloaded object does not match its listed size or its MD5 ETag."""


class IncompleteShard(Exception):
    """Some objects of a shard failed with transient errors after every retry; a later retry may finish it."""


class S3RequestFailed(Exception):
    """An S3 request failed after its retries; the message is redacted (``describe_error``).

    botocore's errors carry the request URL, and a presigned URL carries the credentials: this error
    is what leaves occ in their place (Prefect's logs and task states, the terminal), raised
    ``from None`` so that no traceback prints the original.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient  # as is_transient judged the original error


def credential_values(client: Any) -> tuple[str, ...]:
    """The access key id, secret key and session token the client signs with (those it has)."""
    credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
    if credentials is None:
        return ()
    try:
        frozen = credentials.get_frozen_credentials()
    except Exception:  # a refresh that fails here must not hide the error being described
        return ()
    return tuple(value for value in (frozen.access_key, frozen.secret_key, frozen.token) if value)


def describe_error(exc: BaseException, client: Any = None) -> str:
    """``"{type}: {message}"`` of an error, redacted: the one way ingest turns an error into text.

    Args:
        exc: The error.
        client: The botocore client whose credentials must not appear (besides those of the
            environment, which ``redact`` always blanks).
    """
    return redact(f"{type(exc).__name__}: {exc}", credential_values(client))


def backoff_delay(attempt: int, base: float, cap: float = 20.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before try ``attempt + 1``: uniform in [0, min(cap, base * 2**(attempt-1))].

    (Full jitter.)
    """
    return (rng or random).uniform(0.0, min(cap, base * 2 ** (attempt - 1)))


def call_with_retries(fn: Callable[[], T], max_attempts: int, base_delay: float) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors and checksum mismatches with backoff.

    Raises:
        The last error, at once when it is permanent, or after ``max_attempts`` tries.
    """
    for attempt in range(1, max_attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == max_attempts or not (is_transient(exc) or isinstance(exc, ChecksumMismatch)):
                raise
            time.sleep(backoff_delay(attempt, base_delay))
    raise AssertionError("unreachable: the last attempt returns or raises")


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One object: what was listed, what is on disk, and how the last run dealt with it."""

    key: str
    size: int
    etag: str
    sha256: str | None
    local_path: str | None  # relative to ROOT, POSIX separators; None when rejected
    status: str
    error: str | None = None
    last_modified: str | None = None
    synced_at: str | None = None


MANIFEST_COLUMNS = tuple(field.name for field in dataclasses.fields(ManifestRow))


@dataclasses.dataclass(frozen=True)
class PlannedObject:
    """A listed object, where it goes, and what the manifest knew about it before this run."""

    key: str
    size: int
    etag: str
    last_modified: str
    local_path: str | None
    reject_reason: str | None = None
    known: ManifestRow | None = None


@dataclasses.dataclass(frozen=True)
class SyncPlan:
    """Every listed object in listing order, and when planning started (wall clock, for throughput)."""

    objects: list[PlannedObject]
    started: float

    def shards(self, size: int) -> list[list[PlannedObject]]:
        """The objects cut into consecutive shards of at most ``size``."""
        return [self.objects[i : i + size] for i in range(0, len(self.objects), size)]


def _parse_timestamp(value: str) -> datetime:
    # botocore parses every timestamp with dateutil (~0.1 ms each, 2,000 per listing of 2,000 keys):
    # ISO 8601 (listings) and RFC 1123 (headers) have fast stdlib parsers.
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return parsedate_to_datetime(value)
        except (TypeError, ValueError):
            from botocore.utils import parse_timestamp

            return parse_timestamp(value)


@lru_cache(maxsize=8)
def _client(
    endpoint_url: str | None, region: str | None, profile: str | None, unsigned: bool, pool: int
) -> Any:
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    session = botocore.session.Session(profile=profile)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    custom_endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = Config(
        max_pool_connections=pool,
        retries={"total_max_attempts": 1},  # the engine retries, with is_transient deciding
        connect_timeout=10,
        read_timeout=60,
        parameter_validation=False,
        # The engine checks size and MD5 itself; botocore would add CRC32 work to every request.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if custom_endpoint else None,
        signature_version=UNSIGNED if unsigned else None,
    )
    return session.create_client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def client_for(cfg: SyncConfig) -> Any:
    """A botocore S3 client for ``cfg`` (standard credential chain), shared by threads and shards."""
    pool = max(cfg.workers, len(cfg.folders))  # folders are listed concurrently
    return _client(cfg.endpoint_url, cfg.region, cfg.profile, cfg.no_sign_request, pool)


_S3_XML = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def parse_listing_page(xml: bytes) -> dict[str, Any]:
    """A ListObjectsV2 answer (``EncodingType=url``) as the parts ``list_objects_v2`` would return.

    Only what the engine reads: Contents (Key, Size, ETag, LastModified), IsTruncated,
    NextContinuationToken.
    """
    from urllib.parse import unquote_plus
    from xml.etree import ElementTree

    root = ElementTree.fromstring(xml)
    contents = [
        {
            "Key": unquote_plus(item.findtext(f"{_S3_XML}Key")),
            "Size": int(item.findtext(f"{_S3_XML}Size")),
            "ETag": item.findtext(f"{_S3_XML}ETag"),
            "LastModified": _parse_timestamp(item.findtext(f"{_S3_XML}LastModified")),
        }
        for item in root.iter(f"{_S3_XML}Contents")
    ]
    page: dict[str, Any] = {
        "Contents": contents,
        "IsTruncated": root.findtext(f"{_S3_XML}IsTruncated") == "true",
    }
    if page["IsTruncated"]:
        page["NextContinuationToken"] = root.findtext(f"{_S3_XML}NextContinuationToken")
    return page


def _list_page(client: Any, request: dict[str, str], fast: list[bool]) -> dict[str, Any]:
    """One ListObjectsV2 page; ``fast[0]`` says whether the presigned path is still worth trying."""
    http = getattr(getattr(client, "_endpoint", None), "http_session", None)
    if fast[0] and http is not None:
        # As for small GETs (_Downloader._open): a presigned request on the client's own session,
        # parsed with ElementTree, costs a fraction of botocore's generic XML parser (~80 us per
        # listed key). Any answer but 200 goes the regular way, which raises typed errors and
        # follows redirects, and ends the fast path for this folder.
        from botocore.awsrequest import AWSRequest

        url = client.generate_presigned_url("list_objects_v2", Params={**request, "EncodingType": "url"})
        response = http.send(AWSRequest(method="GET", url=url).prepare())
        if response.status_code == 200:
            return parse_listing_page(response.content)
        fast[0] = False
    return client.list_objects_v2(**request)


def _list_folder(client: Any, bucket: str, folder_prefix: str, cfg: SyncConfig) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    request = {"Bucket": bucket, "Prefix": folder_prefix}
    fast = [True]
    while True:
        page = call_with_retries(
            lambda: _list_page(client, request, fast), cfg.max_attempts, cfg.backoff_seconds
        )
        contents.extend(page.get("Contents", ()))
        if not page.get("IsTruncated"):
            return contents
        request["ContinuationToken"] = page["NextContinuationToken"]


def list_objects(client: Any, cfg: SyncConfig) -> list[dict[str, Any]]:
    """Every object under ``PREFIX/{folder}/`` for the configured folders, listed concurrently.

    Raises:
        botocore.exceptions.ClientError: A folder cannot be listed (no bucket, access denied, ...).
    """
    prefixes = [f"{cfg.prefix}{folder.strip('/')}/" for folder in cfg.folders]
    with ThreadPoolExecutor(len(prefixes)) as pool:
        pages = list(pool.map(lambda prefix: _list_folder(client, cfg.bucket, prefix, cfg), prefixes))
    return [item for page in pages for item in page]


def _manifest_schema() -> Any:
    import pyarrow as pa

    return pa.schema([(name, pa.int64() if name == "size" else pa.string()) for name in MANIFEST_COLUMNS])


def _read_rows(path: Path) -> list[ManifestRow]:
    import pyarrow.parquet as pq

    # ParquetFile, not read_table: read_table goes through pyarrow.dataset, which imports pandas (~1 s).
    columns = pq.ParquetFile(path).read(columns=list(MANIFEST_COLUMNS)).to_pydict()
    return [
        ManifestRow(*values) for values in zip(*(columns[name] for name in MANIFEST_COLUMNS), strict=True)
    ]


def _write_rows(path: Path, rows: Iterable[ManifestRow]) -> Path:
    import json
    from io import BytesIO

    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    # Rows go through Arrow's JSON reader: building arrays from Python lists makes pyarrow import
    # pandas (~0.5 s), which would dominate a no-op re-sync.
    lines = "".join(json.dumps(vars(row)) + "\n" for row in rows).encode()
    schema = _manifest_schema()
    if lines:
        options = pa_json.ReadOptions(use_threads=False, block_size=max(1 << 20, len(lines) + 1))
        parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
        table = pa_json.read_json(BytesIO(lines), read_options=options, parse_options=parse)
    else:
        table = schema.empty_table()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def manifest_path(root: Path) -> Path:
    """Where the manifest of a destination root lives."""
    return root / MANIFEST_NAME


def _checkpoint_files(root: Path) -> list[Path]:
    folder = root / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.parquet"), key=lambda path: path.stat().st_mtime_ns)


def load_manifest(root: Path) -> dict[str, ManifestRow]:
    """Manifest rows by key: the manifest, then any checkpoints left by an interrupted run (newer wins)."""
    rows: dict[str, ManifestRow] = {}
    for path in [manifest_path(root), *_checkpoint_files(root)]:
        if path.exists():
            rows.update((row.key, row) for row in _read_rows(path))
    return rows


def write_manifest(root: Path, rows: Iterable[ManifestRow]) -> Path:
    """Fold ``rows`` into the manifest, then drop the checkpoints.

    Keys listed before and not now keep their rows.
    """
    merged = load_manifest(root)
    merged.update((row.key, row) for row in rows)
    path = _write_rows(manifest_path(root), sorted(merged.values(), key=lambda row: row.key))
    for checkpoint in _checkpoint_files(root):
        checkpoint.unlink(missing_ok=True)
    return path


class Checkpoint:
    """The rows of a running sync, written to ``ROOT/.occ-manifest.d/{name}.parquet`` every few seconds."""

    def __init__(self, root: Path, name: str, interval: float) -> None:
        self.path = root / CHECKPOINT_DIR / f"{name}.parquet"
        self.interval = interval
        self.rows: list[ManifestRow] = []
        self._last = time.monotonic()

    def add(self, row: ManifestRow) -> None:
        self.rows.append(row)
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        _write_rows(self.path, self.rows)
        self._last = time.monotonic()


_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # occ_core.fsio.temp_sibling


def remove_stale_temp_files(root: Path, objects: Iterable[PlannedObject]) -> int:
    """Delete temporary files a killed run left next to the planned objects; returns how many."""
    folders = {os.path.dirname(obj.local_path) for obj in objects if obj.local_path}
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(root / folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if _TEMP_NAME.match(entry.name) and entry.is_file():
                os.unlink(entry.path)
                removed += 1
    return removed


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def plan_sync(cfg: SyncConfig, client: Any) -> SyncPlan:
    """List the configured folders and pair each object with its local path and manifest row.

    Directory markers (keys ending in /) are not files and are left out.

    Raises:
        S3RequestFailed: The listing failed after its retries (no bucket, access denied, endpoint
            down); transient when a later try may pass.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    started = time.time()
    root = cfg.dest.expanduser().resolve()
    with ThreadPoolExecutor(1) as pool:
        # Reading the manifest (and importing pyarrow) runs while the server answers the listing.
        known_future = pool.submit(load_manifest, root)
        try:
            listing = list_objects(client, cfg)
        except (BotoCoreError, ClientError) as exc:
            # `from None`: a traceback of the chained botocore error would print the signed URL.
            message = f"cannot list {cfg.source}: {describe_error(exc, client)}"
            raise S3RequestFailed(message, is_transient(exc)) from None
        known = known_future.result()
    objects = []
    for item in listing:
        key = item["Key"]
        if key.endswith("/"):
            continue
        try:
            local_path, reason = relative_path_for(key, cfg.prefix), None
        except BadSample as bad:
            local_path, reason = None, bad.reason
        objects.append(
            PlannedObject(
                key=key,
                size=item["Size"],
                etag=item["ETag"].strip('"'),
                last_modified=item["LastModified"].isoformat(),
                local_path=local_path,
                reject_reason=reason,
                known=known.get(key),
            )
        )
    return SyncPlan(objects, started)


def _hash_file(path: str) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def _vouched_by_manifest(obj: PlannedObject) -> bool:
    """The manifest recorded this very object (size, ETag, place) as in place."""
    known = obj.known
    return (
        known is not None
        and known.status in _PRESENT
        and (known.size, known.etag, known.local_path) == (obj.size, obj.etag, obj.local_path)
    )


def settled_row(obj: PlannedObject, root: Path, verify: bool, now: str) -> ManifestRow | None:
    """The row of an object that needs no transfer (rejected, or already in place), else None."""
    if obj.local_path is None:
        return ManifestRow(
            obj.key, obj.size, obj.etag, None, None, REJECTED, obj.reject_reason, obj.last_modified, now
        )
    path = os.path.join(root, obj.local_path)
    try:
        if os.stat(path).st_size != obj.size:
            return None
    except OSError:
        return None
    if _vouched_by_manifest(obj):
        sha256 = obj.known.sha256
        if verify and _hash_file(path)[1] != sha256:
            return None
    elif _PLAIN_MD5.match(obj.etag):
        md5, sha256 = _hash_file(path)
        if md5 != obj.etag:
            return None
    else:
        return None
    return ManifestRow(
        obj.key, obj.size, obj.etag, sha256, obj.local_path, SKIPPED, None, obj.last_modified, now
    )


def _check(key: str, got_size: int, want_size: int, md5: str, etag: str, encrypted: bool) -> None:
    if got_size != want_size:
        raise ChecksumMismatch(f"{key}: got {got_size} bytes, expected {want_size}")
    # SSE-KMS and SSE-C ETags look like MD5s but are not; multipart ETags end in -N.
    if not encrypted and _PLAIN_MD5.match(etag) and md5 != etag:
        raise ChecksumMismatch(f"{key}: MD5 {md5} does not match ETag {etag}")


def _encrypted(sse: str | None, sse_customer_algorithm: str | None) -> bool:
    """Whether the object's ETag is not its MD5 because of SSE-KMS or SSE-C."""
    return (sse or "").startswith("aws:kms") or bool(sse_customer_algorithm)


_V2_QUERY = frozenset({"AWSAccessKeyId", "Signature", "Expires"})
_V4_QUERY = frozenset(
    {
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
    }
)


class PresignedGets:
    """Presigned GETs of one bucket's keys, as ``client.generate_presigned_url("get_object")`` makes them.

    botocore presigns through the client's events and endpoint rules: 0.27 ms of CPU per key with
    the request prepared, on the benchmark's machine; this way 0.12 ms. The address and the auth
    scheme are the same for every key of a bucket, so one presign of a probe key gives the base URL
    (path-style or virtual-host, per the client) and the scheme; each key then gets its path
    appended and is signed with botocore's own query signer (``HmacV1QueryAuth`` or
    ``S3SigV4QueryAuth``, as the probe shows) on the client's credentials, frozen per request so
    that refreshable credentials refresh. A probe in any other form (S3
    Express sessions, extra signed headers) keeps presigning each key through the client.
    """

    _PROBE_KEY = "occ-probe"
    EXPIRES = 3600  # generate_presigned_url's default

    def __init__(self, client: Any, bucket: str) -> None:
        from urllib.parse import parse_qs, urlsplit, urlunsplit

        self.client, self.bucket = client, bucket
        probe = urlsplit(self._presign(self._PROBE_KEY))
        query = {name: values[0] for name, values in parse_qs(probe.query, keep_blank_values=True).items()}
        path = probe.path.removesuffix(self._PROBE_KEY)
        self.base = urlunsplit((probe.scheme, probe.netloc, path, "", ""))
        # SigV2 signs "/bucket/key" even when the bucket is in the host name (botocore's auth_path).
        self.auth_prefix = path if path.endswith(f"/{bucket}/") else f"/{bucket}{path}"
        self.credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        names = set(query) - {"X-Amz-Security-Token", "x-amz-security-token"}
        self.scheme: str | None = None
        self.region = ""
        if path == probe.path:  # the key is not at the end of the path: leave it to the client
            return
        if not query:
            self.scheme = "unsigned"
        elif self.credentials is None:
            return
        elif names == _V2_QUERY:
            self.scheme = "v2"
        elif (
            names == _V4_QUERY
            and query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
            and query["X-Amz-SignedHeaders"] == "host"
            and query["X-Amz-Expires"] == str(self.EXPIRES)
        ):
            self.scheme, self.region = "v4", query["X-Amz-Credential"].split("/")[2]

    def _presign(self, key: str) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key})

    def request(self, key: str) -> Any:
        """A prepared, presigned GET of ``key`` (a ``botocore.awsrequest.AWSPreparedRequest``)."""
        from botocore.auth import HmacV1QueryAuth, S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest
        from botocore.utils import percent_encode

        if self.scheme is None:
            return AWSRequest(method="GET", url=self._presign(key)).prepare()
        quoted = percent_encode(key, safe="/~")
        request = AWSRequest(method="GET", url=self.base + quoted)
        if self.scheme == "v2":
            request.auth_path = self.auth_prefix + quoted
            HmacV1QueryAuth(self.credentials.get_frozen_credentials(), self.EXPIRES).add_auth(request)
        elif self.scheme == "v4":
            credentials = self.credentials.get_frozen_credentials()
            S3SigV4QueryAuth(credentials, "s3", self.region, self.EXPIRES).add_auth(request)
        return request.prepare()


class _Downloader:
    """Fetches one object to its place under ROOT: temporary file, check, rename."""

    def __init__(self, client: Any, cfg: SyncConfig, root: Path, large: bool) -> None:
        self.client, self.cfg, self.root = client, cfg, root
        # The client's own HTTP session (its pool, proxies, CA bundle and timeouts). A private
        # attribute, stable for years; without it every object takes the get_object path.
        self.http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self.presigned = PresignedGets(client, cfg.bucket) if self.http is not None else None
        self.transfer = None
        if large:
            from s3transfer.manager import TransferConfig, TransferManager

            config = TransferConfig(
                multipart_threshold=cfg.multipart_threshold,
                multipart_chunksize=cfg.multipart_threshold,
                max_request_concurrency=cfg.workers,
                num_download_attempts=cfg.max_attempts,
            )
            self.transfer = TransferManager(client, config)

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.shutdown()

    def fetch(self, obj: PlannedObject, now: str) -> ManifestRow:
        """Download with retries; returns the ``downloaded`` row or raises the final error."""
        path = self.root / obj.local_path
        small = self.transfer is None or obj.size <= self.cfg.multipart_threshold
        fetch_once = self._get_small if small else self._get_large
        size, etag, sha256 = call_with_retries(
            lambda: fetch_once(obj, path), self.cfg.max_attempts, self.cfg.backoff_seconds
        )
        return ManifestRow(
            obj.key, size, etag, sha256, obj.local_path, DOWNLOADED, None, obj.last_modified, now
        )

    def _open(self, key: str) -> tuple[str, int, bool, Iterable[bytes]]:
        """ETag, length, SSE flag and body of one GET of a small object."""
        if self.http is not None:
            # A presigned GET sent on the client's session costs 35% less CPU than get_object's full
            # request pipeline (events, header parsing of ~50 output members): on a 2-core machine
            # next to a local server that CPU is the throughput. Any answer but 200 goes the regular
            # way below, which follows region redirects and raises typed errors, and turns this path
            # off for the rest of the run (a wrong region would otherwise cost two requests per key).
            response = self.http.send(self.presigned.request(key))
            if response.status_code != 200:
                self.http = None
            else:
                headers = response.headers
                encrypted = _encrypted(
                    headers.get("x-amz-server-side-encryption"),
                    headers.get("x-amz-server-side-encryption-customer-algorithm"),
                )
                return (
                    headers["ETag"].strip('"'),
                    int(headers["Content-Length"]),
                    encrypted,
                    (response.content,),
                )
        response = self.client.get_object(Bucket=self.cfg.bucket, Key=key)
        encrypted = _encrypted(response.get("ServerSideEncryption"), response.get("SSECustomerAlgorithm"))
        return (
            response["ETag"].strip('"'),
            response["ContentLength"],
            encrypted,
            response["Body"].iter_chunks(CHUNK),
        )

    def _get_small(self, obj: PlannedObject, path: Path) -> tuple[int, str, str]:
        # One GET streamed to disk: download_file would add a HeadObject and s3transfer's queues.
        etag, length, encrypted, body = self._open(obj.key)
        md5, sha256, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                for chunk in body:
                    fh.write(chunk)
                    md5.update(chunk)
                    sha256.update(chunk)
                    size += len(chunk)
            _check(obj.key, size, length, md5.hexdigest(), etag, encrypted)
        return size, etag, sha256.hexdigest()

    def _get_large(self, obj: PlannedObject, path: Path) -> tuple[int, str, str]:
        with atomic_path(path) as tmp:
            self.transfer.download(self.cfg.bucket, obj.key, str(tmp)).result()
            size = os.path.getsize(tmp)
            md5, sha256 = _hash_file(str(tmp))
            _check(obj.key, size, obj.size, md5, obj.etag, encrypted=False)
        return size, obj.etag, sha256


def _failed_row(obj: PlannedObject, exc: Exception, now: str, client: Any) -> ManifestRow:
    # The prefix tells a reader of the manifest whether a re-run may help.
    error = f"{'transient' if is_transient(exc) else 'permanent'} {describe_error(exc, client)}"
    return ManifestRow(
        obj.key, obj.size, obj.etag, None, obj.local_path, FAILED, error, obj.last_modified, now
    )


@lru_cache(maxsize=4)
def _transfer_pool(workers: int) -> ThreadPoolExecutor:
    # One pool per process: concurrent shards of the flow share it, so transfers stay at `workers`.
    return ThreadPoolExecutor(workers, thread_name_prefix="occ-s3")


def sync_objects(
    objects: Sequence[PlannedObject],
    cfg: SyncConfig,
    client: Any,
    checkpoint: Checkpoint | None = None,
    on_row: Callable[[ManifestRow], None] | None = None,
) -> list[ManifestRow]:
    """Bring every object into place; one row per object, in no particular order.

    Rejected keys and objects already in place are settled without a transfer; the rest are
    downloaded concurrently. A failure is recorded in its row, never raised.

    Args:
        objects: Planned objects (see ``plan_sync``).
        cfg: Sync settings.
        client: botocore S3 client (``client_for(cfg)``).
        checkpoint: Receives every row; written every ``cfg.checkpoint_seconds`` and at the end.
        on_row: Called with each row as it is settled (progress display).
    Returns:
        The rows, statuses downloaded / skipped / failed / rejected.
    """
    root = cfg.dest.expanduser().resolve()
    now = _utc_now()
    rows: list[ManifestRow] = []

    def settle(row: ManifestRow) -> None:
        rows.append(row)
        if checkpoint is not None:
            checkpoint.add(row)
        if on_row is not None:
            on_row(row)

    if cfg.verify:  # hashing every file is worth the thread pool
        settled = list(
            _transfer_pool(cfg.workers).map(lambda obj: settled_row(obj, root, True, now), objects)
        )
    else:
        settled = [settled_row(obj, root, False, now) for obj in objects]
    todo = [obj for obj, row in zip(objects, settled, strict=True) if row is None]
    for row in settled:
        if row is not None:
            settle(row)
    if not todo:
        return rows
    if checkpoint is not None:
        checkpoint.flush()  # marks the run as started: a killed run leaves temp files to sweep
    downloader = _Downloader(client, cfg, root, large=any(obj.size > cfg.multipart_threshold for obj in todo))
    futures: dict[Future[ManifestRow], PlannedObject] = {}
    try:
        for obj in todo:
            futures[_transfer_pool(cfg.workers).submit(downloader.fetch, obj, now)] = obj
        for future in as_completed(futures):
            try:
                settle(future.result())
            except Exception as exc:
                settle(_failed_row(futures[future], exc, now, client))
    finally:
        for future in futures:
            future.cancel()
        downloader.close()
        if checkpoint is not None:
            checkpoint.flush()
    return rows


def sync_shard(objects: Sequence[PlannedObject], cfg: SyncConfig, name: str) -> list[ManifestRow]:
    """Sync one shard of the flow, checkpointed as ``name``; the finish step folds it into the manifest.

    Raises:
        IncompleteShard: Some objects failed with transient errors after every retry (its rows are
            in the checkpoint, so a retry of the shard skips what is done).
    """
    root = cfg.dest.expanduser().resolve()
    rows = sync_objects(objects, cfg, client_for(cfg), Checkpoint(root, name, cfg.checkpoint_seconds))
    transient = [
        row for row in rows if row.status == FAILED and row.error and row.error.startswith("transient ")
    ]
    if transient:
        raise IncompleteShard(f"{len(transient)} objects failed transiently, e.g. {transient[0].key}")
    return rows


def summarize(rows: Sequence[ManifestRow], seconds: float) -> StageReport:
    """Counts, bytes, throughput and the failed or rejected keys of a sync."""
    report = StageReport("ingest", seconds=seconds)
    downloaded_bytes = rejected = 0
    for row in rows:
        if row.status == DOWNLOADED:
            report.ok += 1
            downloaded_bytes += row.size
        elif row.status == SKIPPED:
            report.skipped += 1
        else:
            report.quarantine(row.key, row.local_path or row.key, row.error or row.status)
            rejected += row.status == REJECTED
    report.extra.update(
        objects=len(rows),
        bytes=downloaded_bytes,
        rejected=rejected,
        mb_per_s=round(downloaded_bytes / 1e6 / seconds, 3) if seconds > 0 else 0.0,
        objects_per_s=round(len(rows) / seconds, 1) if seconds > 0 else 0.0,
    )
    return report


def count_by_folder(rows: Iterable[ManifestRow], cfg: SyncConfig) -> dict[str, int]:
    """Listed objects per configured folder, in ``cfg.folders`` order; 0 for a folder with none."""
    counts = dict.fromkeys(cfg.folders, 0)
    for row in rows:
        folder = row.key[len(cfg.prefix) :].split("/", 1)[0]
        if folder in counts:
            counts[folder] += 1
    return counts


def finish_sync(cfg: SyncConfig, rows: Sequence[ManifestRow], started: float) -> StageReport:
    """Write the manifest with ``rows`` and return the summary of the run that started at ``started``.

    The summary's ``objects_by_folder`` holds the listed objects of each folder (``count_by_folder``).
    """
    write_manifest(cfg.dest.expanduser().resolve(), rows)
    report = summarize(rows, time.time() - started)
    report.extra["objects_by_folder"] = count_by_folder(rows, cfg)
    return report


def failure_table(report: StageReport, limit: int = 500) -> list[dict[str, str]]:
    """The first ``limit`` failed or rejected keys with their (redacted) reasons, as table rows."""
    return [{"key": q.sample_id, "reason": q.reason} for q in report.quarantined[:limit]]


def _folder_counts(report: StageReport) -> str:
    return ", ".join(f"{folder} {n}" for folder, n in report.extra["objects_by_folder"].items())


def check_not_empty(report: StageReport, cfg: SyncConfig) -> None:
    """Refuse a sync that listed nothing in a configured folder (a wrong prefix, split or bucket).

    Raises:
        ValueError: Some folder had no objects; the message gives the count of every folder.
    """
    empty = [folder for folder, n in report.extra["objects_by_folder"].items() if n == 0]
    if empty:
        where = ", ".join(f"s3://{cfg.bucket}/{cfg.prefix}{folder}/" for folder in empty)
        raise ValueError(f"no objects under {where} (objects listed: {_folder_counts(report)})")


def format_summary(report: StageReport, cfg: SyncConfig) -> str:
    """The terminal summary: counts, bytes, speed, where the data and the manifest are."""
    extra = report.extra
    root = cfg.dest.expanduser().resolve()
    lines = [
        f"{cfg.source} -> {root}",
        f"  {extra['objects']} objects: {report.ok} downloaded ({extra['bytes'] / 1e6:.1f} MB), "
        f"{report.skipped} skipped, {report.failed} failed ({extra['rejected']} rejected keys)",
        f"  {report.seconds:.2f} s, {extra['mb_per_s']:.2f} MB/s, {extra['objects_per_s']:.1f} objects/s",
        f"  listed by folder: {_folder_counts(report)}",
        f"  manifest: {manifest_path(root)}",
    ]
    lines += [f"  FAILED {q.sample_id}: {q.reason}" for q in report.quarantined[:20]]
    if len(report.quarantined) > 20:
        lines.append(f"  ... and {len(report.quarantined) - 20} more (status column of the manifest)")
    return "\n".join(lines)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="obj", file=sys.stderr, dynamic_ncols=True, leave=False)


def sync(cfg: SyncConfig, progress: bool = False) -> StageReport:
    """Mirror the configured folders into ``cfg.dest``: plan, transfer, manifest. The CLI's engine.

    Args:
        cfg: What to mirror and where.
        progress: Show a progress bar on stderr.
    Returns:
        The summary (see ``finish_sync``); failures are counted, not raised.
    Raises:
        S3RequestFailed: The listing failed (no bucket, access denied, endpoint down, ...).
    """
    root = cfg.dest.expanduser().resolve()
    client = client_for(cfg)
    plan = plan_sync(cfg, client)
    if _checkpoint_files(root):
        remove_stale_temp_files(root, plan.objects)
    checkpoint = Checkpoint(root, f"cli-{os.getpid()}", cfg.checkpoint_seconds)
    bar = _progress_bar(len(plan.objects), progress)
    try:
        rows = sync_objects(plan.objects, cfg, client, checkpoint, on_row=bar and (lambda row: bar.update()))
    finally:
        if bar is not None:
            bar.close()
    return finish_sync(cfg, rows, plan.started)


def _help(name: str) -> str:
    return SyncConfig.model_fields[name].description or ""


def _comma_separated(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(part for value in values for part in value.split(",") if part)


def _option_name(field: str) -> str:
    return "SOURCE" if field == "source" else f"--{field.replace('_', '-')}"


def config_from_options(source: str, dest: Path, **options: Any) -> SyncConfig:
    """The ``SyncConfig`` of a command line; options left out (None, empty, False) keep their defaults.

    ``splits`` and ``include`` may be comma-separated or repeated.

    Raises:
        click.UsageError: A value is invalid; one line naming the option and the reason (exit 2).
    """
    from pydantic import ValidationError

    for name in ("splits", "include"):
        if name in options:
            options[name] = _comma_separated(options[name])
    # `is not False`, not `!= False`: 0 (``--workers 0``) is a value to check, not an option left out.
    given = {name: value for name, value in options.items() if value not in (None, ()) and value is not False}
    try:
        return SyncConfig(source=source, dest=dest, **given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_option_name(str(error['loc'][0]))}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise click.UsageError(
            f"invalid value for {problems}", click.get_current_context(silent=True)
        ) from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so SIGTERM also flushes the checkpoint and removes temporary files


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--dest", required=True, type=click.Path(file_okay=False, path_type=Path), help=_help("dest"))
@click.option(
    "--splits",
    multiple=True,
    help=f"{_help('splits')}; comma-separated or repeated [default: train,val,test]",
)
@click.option("--include", multiple=True, help=f"{_help('include')}; comma-separated or repeated")
@click.option("--endpoint-url", help=_help("endpoint_url"))
@click.option("--no-sign-request", is_flag=True, help=_help("no_sign_request"))
@click.option("--region", help=_help("region"))
@click.option("--profile", help=_help("profile"))
@click.option("--workers", type=int, help=f"{_help('workers')} [default: OCC_WORKERS setting]")
@click.option("--max-attempts", type=int, help=f"{_help('max_attempts')} [default: 5]")
@click.option("--verify", is_flag=True, help=_help("verify"))
@click.option(
    "-q", "--quiet", is_flag=True, help="no progress bar (there is none when stderr is not a terminal)"
)
def cli(source: str, dest: Path, quiet: bool, **options: Any) -> None:
    """Mirror s3://BUCKET/PREFIX/{split}/... (SOURCE is s3://BUCKET/PREFIX) into DEST/{split}/...

    Exits 1 when any object failed or was rejected or a folder held no objects, 130 when interrupted
    (re-run to resume).
    """
    redact_logs()  # botocore's debug log (occ -vv) prints signed URLs and authorization headers
    cfg = config_from_options(source, dest, **options)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = sync(cfg, progress=not quiet and sys.stderr.isatty())
    except KeyboardInterrupt:
        click.echo(f"occ ingest: interrupted; run it again to resume ({cfg.dest})", err=True)
        sys.exit(130)
    except Exception as exc:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, S3RequestFailed):
            raise click.ClickException(str(exc)) from None
        if not isinstance(exc, BotoCoreError | ClientError):
            raise
        raise click.ClickException(f"cannot sync {cfg.source}: {describe_error(exc)}") from None
    finally:
        # The command ends here: without this, the interpreter's last collections walk every object
        # botocore and pyarrow made (the S3 model, the endpoint rules), 0.2-0.3 s of a no-op re-sync.
        gc.freeze()
    click.echo(format_summary(report, cfg))
    try:
        check_not_empty(report, cfg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if report.failed:
        sys.exit(1)


if __name__ == "__main__":
    cli()
