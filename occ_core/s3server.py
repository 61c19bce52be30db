"""A local S3 server (moto) for the embedded default, the tests and the benchmark.

Run it in the foreground (prints the endpoint URL, Ctrl-C stops it):

    occ s3 serve [--host 127.0.0.1] [--port 0]
    python -m occ_core.s3server serve

From Python, as a separate process that stops with its parent (the server then never competes with
the client for one interpreter lock):

    with start_s3_server() as server, server.environment():
        upload_tree(local_root, "obman-demo", "obman", server.endpoint_url)

moto accepts any credentials, but botocore refuses to sign without some: ``S3Server.environment()``
sets dummy ones for the block only, so they never leak into clients meant for real buckets.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

LOCAL_ENVIRONMENT: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "occ-local",
    "AWS_SECRET_ACCESS_KEY": "occ-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_ENDPOINT_PATTERN = re.compile(r"http://\S+:\d+")


_ISO_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d")


def _fast_timestamps() -> None:
    """Let moto's response serializer parse its own ISO 8601 timestamps with the stdlib.

    moto 5.2 keeps LastModified as an ISO string and re-parses it with dateutil (via botocore's
    parse_to_aware_datetime, ~0.25 ms) for every key it lists: about a third of the server's CPU per
    ListObjectsV2 page. ``datetime.fromisoformat`` gives the same aware datetime; anything else
    (epoch numbers, RFC 1123, datetimes) still goes to botocore. Drop this once moto serializes
    datetimes without re-parsing them.
    """
    from datetime import UTC, datetime

    import moto.core.serialize

    parse_slowly = moto.core.serialize.parse_to_aware_datetime

    def parse_to_aware_datetime(value: Any) -> datetime:
        if isinstance(value, str) and _ISO_TIMESTAMP.match(value):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                return parse_slowly(value)
            return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        return parse_slowly(value)

    moto.core.serialize.parse_to_aware_datetime = parse_to_aware_datetime


def _keep_alive_handler(base: type) -> type:
    """``base`` (a werkzeug request handler) keeping HTTP/1.1 connections open after bodiless requests.

    werkzeug 3 closes every connection, and after each response drains whatever the client sent
    next, because http.server cannot skip an unread request body. A request without a body (GET,
    HEAD, listings: all of a sync) leaves nothing to skip: it gets an empty body stream (so the drain
    reads nothing) and its connection serves the next request; requests with a body still close.
    Without this every request costs a TCP connect on both sides and a new server thread. Drop it
    once werkzeug keeps connections alive.
    """

    class KeepAliveRequestHandler(base):
        # Headers and body go out in two writes: with Nagle on, the body waits for the client's delayed
        # ACK (about 40 ms per GET on a kept-alive connection).
        disable_nagle_algorithm = True

        def _bodyless(self) -> bool:
            return self.headers.get("Content-Length", "0") == "0" and "Transfer-Encoding" not in self.headers

        def run_wsgi(self) -> None:
            if not self._bodyless():
                return super().run_wsgi()
            connection_stream, self.rfile = self.rfile, io.BytesIO()
            try:
                return super().run_wsgi()
            finally:
                self.rfile = connection_stream

        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "connection" and value.lower() == "close" and self._bodyless():
                return
            super().send_header(keyword, value)

    return KeepAliveRequestHandler


def _moto_wsgi_server(host: str, port: int) -> Any:
    """moto's S3 application on a threaded werkzeug server, bound and listening (not yet serving)."""
    import moto.backends
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    # moto 5.2 matches each request's Host against a fresh scan of its package directory (about 170
    # stat calls, twice per request: moto/backends.py list_of_moto_modules), a third of its time per
    # small GET. The package cannot change while serving, so scan once. Drop this once moto caches it.
    modules = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: modules
    _fast_timestamps()
    # One log line per request costs time and floods the log; errors still show.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(
        host, port, app, threaded=True, request_handler=_keep_alive_handler(MotoRequestHandler)
    )
    os.environ.setdefault("MOTO_PORT", str(server.port))  # moto builds its own URLs from it
    return server


def _exit_when_orphaned(poll_seconds: float = 1.0) -> None:
    """Stop this process once its parent is gone, so a killed test run leaves no server behind."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(0)

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


@dataclass
class S3Server:
    """A moto S3 server running in a child process; a context manager that stops it on exit."""

    endpoint_url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        """Dummy credentials and region that clients of this server need (merge into a subprocess env)."""
        return dict(LOCAL_ENVIRONMENT)

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Set ``env`` in ``os.environ`` for the block, then restore what was there."""
        saved = {name: os.environ.get(name) for name in LOCAL_ENVIRONMENT}
        os.environ.update(LOCAL_ENVIRONMENT)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server process (kill it after ``timeout`` seconds), drop its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _log_tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _read_endpoint(process: subprocess.Popen, log_path: Path, deadline: float) -> str:
    """The endpoint URL the child prints on its first stdout line."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            raise RuntimeError(
                f"moto server printed no endpoint in time; its log ends:\n{_log_tail(log_path)}"
            )
    line = process.stdout.readline()
    match = _ENDPOINT_PATTERN.search(line)
    if not match:
        raise RuntimeError(
            f"moto server did not start ({line.strip()!r}); its log ends:\n{_log_tail(log_path)}"
        )
    return match.group(0)


def _wait_until_answers(endpoint_url: str, deadline: float) -> None:
    host, port = endpoint_url.removeprefix("http://").rsplit(":", 1)
    while True:
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            connection.close()


def start_s3_server(host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> S3Server:
    """Start moto's S3 server in a child process and wait until it answers.

    Args:
        host: Address to bind; keep loopback unless the server is meant to be shared.
        port: TCP port; 0 picks a free one.
        timeout: Seconds to wait for the server to answer.
    Returns:
        The running server; use it as a context manager or call ``stop()``.
    Raises:
        RuntimeError: The server exited or printed no endpoint (the message holds its log tail).
    """
    log = tempfile.NamedTemporaryFile(prefix="occ-s3-server-", suffix=".log", delete=False)
    log_path = Path(log.name)
    command = [
        sys.executable,
        "-m",
        "occ_core.s3server",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--managed",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True
    )
    log.close()
    deadline = time.monotonic() + timeout
    try:
        endpoint_url = _read_endpoint(process, log_path, deadline)
        _wait_until_answers(endpoint_url, deadline)
    except BaseException:
        S3Server("", process, log_path).stop()
        raise
    return S3Server(endpoint_url, process, log_path)


def local_client(endpoint_url: str, workers: int = 1) -> Any:
    """A botocore S3 client for a local server: dummy credentials, path-style addressing."""
    import botocore.session
    from botocore.config import Config

    session = botocore.session.Session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=LOCAL_ENVIRONMENT["AWS_DEFAULT_REGION"],
        aws_access_key_id=LOCAL_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
        config=Config(
            max_pool_connections=workers,
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
        ),
    )


@dataclass(frozen=True)
class UploadReport:
    """What ``upload_tree`` put into the bucket."""

    objects: int
    bytes: int
    seconds: float


def upload_tree(root: Path | str, bucket: str, prefix: str, endpoint: str, workers: int = 16) -> UploadReport:
    """Upload every file under ``root`` to ``s3://bucket/prefix/<relative path>`` on a local server.

    Meant for the embedded server (it signs with the dummy local credentials); the bucket is created
    if missing. Large files go up as multipart uploads (s3transfer's 8 MiB threshold).

    Args:
        root: Local directory to upload.
        bucket: Bucket name (created if it does not exist).
        prefix: Key prefix; empty for the bucket root.
        endpoint: Endpoint URL of the server, e.g. ``S3Server.endpoint_url``.
        workers: Concurrent uploads.
    Returns:
        UploadReport with object and byte counts.
    """
    from s3transfer.manager import TransferConfig, TransferManager

    started = time.perf_counter()
    root = Path(root)
    client = local_client(endpoint, workers)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    files = sorted(path for path in root.rglob("*") if path.is_file())
    key_prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    config = TransferConfig(max_request_concurrency=workers, max_submission_concurrency=workers)
    with TransferManager(client, config) as transfer:
        futures = [
            transfer.upload(str(path), bucket, key_prefix + path.relative_to(root).as_posix())
            for path in files
        ]
        for future in futures:
            future.result()
    total = sum(path.stat().st_size for path in files)
    return UploadReport(len(files), total, time.perf_counter() - started)


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on a local server (no error when it exists)."""
    client = local_client(endpoint)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """A local S3 server (moto) for the embedded default and the tests."""


@cli.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="address to bind; keep loopback unless sharing"
)
@click.option(
    "--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="TCP port; 0 picks a free one"
)
@click.option(
    "--managed", is_flag=True, hidden=True, help="child of start_s3_server: quiet, exits with its parent"
)
def serve(host: str, port: int, managed: bool) -> None:
    """Run moto's S3 server until Ctrl-C; prints the endpoint URL first."""
    server = _moto_wsgi_server(host, port)
    endpoint_url = f"http://{host}:{server.port}"
    click.echo(f"S3 server (moto) at {endpoint_url}")
    if managed:
        sys.stdout.flush()
        # The parent reads only the first line: anything moto prints later goes to the log instead,
        # so a full pipe can never block the server.
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        _exit_when_orphaned()
    else:
        click.echo(f"  any credentials work, e.g. AWS_ACCESS_KEY_ID={LOCAL_ENVIRONMENT['AWS_ACCESS_KEY_ID']}")
        click.echo(f"  occ ingest s3://BUCKET/PREFIX --dest ROOT --endpoint-url {endpoint_url}")
        click.echo("  Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    cli()
