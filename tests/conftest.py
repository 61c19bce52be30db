"""Shared test setup: an isolated Prefect home, and fixtures shared across test folders.

Prefect reads its settings at import, so they are set here before any test module imports it.
Fixtures for synthetic ObMan data live in tests/fixtures/obman.py, for the S3 server in
tests/fixtures/s3.py.
"""

from __future__ import annotations

import os
import tempfile

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="occ-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", os.path.join(_PREFECT_HOME, "results"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.obman",
    "tests.fixtures.s3",
    "tests.fixtures.moho_standin",
    "tests.fixtures.train",
]


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect API server and database for the whole session (started on first use)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def occ_home(tmp_path, monkeypatch):
    """Point OCC_HOME at a fresh directory and reset the cached settings."""
    from occ_core.config import get_settings

    home = tmp_path / "occ-home"
    monkeypatch.setenv("OCC_HOME", str(home))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
