"""The embedded default end to end: synthetic ObMan -> local S3 -> ingest -> render -> datasets, twice.

    .venv/bin/python -m pytest tests/e2e/test_demo.py

The second run with the same parameters must do no work: nothing downloaded, rendered or rebuilt.
"""

from __future__ import annotations

import pytest

from flows.demo import DemoConfig, demo_flow

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

SMALL = DemoConfig(n=3, views=1, train=False)  # the train flow has its own test (tests/integration)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("occ-home")
    with pytest.MonkeyPatch.context() as patch:
        from occ_core.config import get_settings

        patch.setenv("OCC_HOME", str(home))
        get_settings.cache_clear()
        try:
            yield demo_flow(SMALL), demo_flow(SMALL)
        finally:
            get_settings.cache_clear()


def test_first_run_produces_every_stage_output(two_runs):
    first, _ = two_runs
    frames = SMALL.n * len(SMALL.splits)
    assert first["ingest"]["failed"] == 0 and first["ingest"]["ok"] > 0
    for split in SMALL.splits:
        assert first["render"][split]["rendered"] == SMALL.n
        assert first["render"][split]["failed"] == 0
        assert first["datasets"][split]["rows"]["sft1"] == SMALL.n
    assert sum(r["rendered"] for r in first["render"].values()) == frames


def test_second_run_downloads_renders_and_builds_nothing(two_runs):
    first, second = two_runs
    assert second["ingest"]["ok"] == 0
    assert second["ingest"]["skipped"] == first["ingest"]["ok"]
    for split in SMALL.splits:
        assert second["render"][split]["rendered"] == 0
        assert second["render"][split]["views_dir"] == first["render"][split]["views_dir"]
        assert second["datasets"][split]["cached"]
        assert second["datasets"][split]["out_dir"] == first["datasets"][split]["out_dir"]
