"""Deployments against a real Prefect server: `prefect deploy` from deployments/prefect.yaml, a process
worker, and `prefect deployment run` as CI would call it.

    .venv/bin/python -m pytest tests/integration/test_deployments.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port; yields the environment that points at it."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
        "OCC_PROJECT_DIR": str(REPO),
        "OCC_HOME": str(home / "occ"),
    }
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_healthy(api, server)
        yield env
    finally:
        _stop(server)
        log.close()


def _prefect(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """Work pool created and every deployment of deployments/prefect.yaml registered."""
    _prefect(prefect_server, "work-pool", "create", "occ-cpu", "--type", "process")
    _prefect(prefect_server, "work-pool", "create", "occ-gpu", "--type", "process")
    _prefect(prefect_server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    return prefect_server


def test_every_deployment_is_registered(deployed):
    listing = _prefect(deployed, "deployment", "ls").stdout
    for name in (
        "occ-demo/embedded-default",
        "ingest/obman",
        "render/rerender",
        "datasets/build",
        "train/stages",
        "evaluate/protocol",
    ):
        assert name in listing


def test_rerender_schedule_is_registered_paused(deployed):
    schedules = _prefect(deployed, "deployment", "schedule", "ls", "render/rerender").stdout
    assert "0 3 * * *" in schedules
    assert "False" in schedules


def test_deployment_run_from_cli_completes_on_a_process_worker(deployed, tiny_obman, tmp_path):
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "occ-cpu"],
        env=deployed,
        cwd=REPO,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        params = json.dumps({"params": {"root": str(tiny_obman), "split": "train"}})
        run = _prefect(
            deployed,
            "deployment",
            "run",
            "datasets/build",
            "--params",
            params,
            "--watch",
            "--watch-timeout",
            "400",
            timeout=450,
        )
    finally:
        _stop(worker)
        worker_log.close()
    output = run.stdout + run.stderr
    assert "Completed" in output, output + (tmp_path / "worker.log").read_text(errors="replace")
