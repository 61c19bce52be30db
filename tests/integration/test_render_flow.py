"""The render flow under a real Prefect server: shards cached on their stage keys, artifacts published.

.venv/bin/python -m pytest tests/integration/test_render_flow.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from moho_bridge.pipeline import RenderParams, plan_render
from occ_core.config import get_settings
from tests.fixtures.prefect_runs import task_states

pytestmark = pytest.mark.integration

SHARDS = 3  # tiny_obman's 5 test samples in shards of 2


def shard_states(flow_state) -> list[str]:
    return [
        state for name, state in sorted(task_states(flow_state).items()) if name.startswith("render-shard")
    ]


def view_times(views_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in views_dir.glob("*_obman_*.png")}


@pytest.fixture(scope="module")
def runs(prefect_harness, tiny_obman, tmp_path_factory):
    """Three runs of one flow: fresh, unchanged, and after the views directory was deleted."""
    from prefect.artifacts import Artifact

    from flows.render import render_flow

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OCC_HOME", str(tmp_path_factory.mktemp("occ_home")))
        get_settings.cache_clear()
        params = RenderParams(root=tiny_obman, views=2, shard_size=2, processes=1)
        first = render_flow(params, return_state=True)
        views_dir = Path(first.result()["views_dir"])
        times = view_times(views_dir)
        table, sheet = Artifact.get("render-summary"), Artifact.get("render-contact-sheet")
        second = render_flow(params, return_state=True)
        times_after_second = view_times(views_dir)
        shutil.rmtree(views_dir)
        third = render_flow(params, return_state=True)
        runs = SimpleNamespace(
            params=params,
            views_dir=views_dir,
            first=first,
            second=second,
            third=third,
            times=times,
            times_after_second=times_after_second,
            table=table,
            sheet=sheet,
        )
    get_settings.cache_clear()
    return runs


def test_first_run_renders_every_view_of_every_sample(runs):
    summary = runs.first.result()
    assert (summary["rendered"], summary["skipped"], summary["failed"]) == (5, 0, 0)
    assert len(runs.times) == 5 * (1 + runs.params.views)


def test_first_run_writes_a_contact_sheet_into_the_views_dir(runs):
    assert Path(runs.first.result()["contact_sheet"]) == runs.views_dir / "contact_sheet.png"


def test_views_go_to_the_stage_directory_of_the_key(runs):
    assert runs.views_dir.parent.name == "render" and runs.views_dir.name == plan_render(runs.params).key


def test_second_run_takes_every_shard_from_the_cache(runs):
    assert shard_states(runs.second) == ["Cached"] * SHARDS


def test_second_run_rewrites_no_file(runs):
    assert runs.times_after_second == runs.times


def test_second_run_reports_nothing_rendered(runs):
    summary = runs.second.result()
    assert (summary["rendered"], summary["skipped"], summary["views"]) == (0, 5, 0)


def test_deleted_views_are_rendered_again_not_served_from_the_cache(runs):
    assert shard_states(runs.third) == ["Completed"] * SHARDS
    assert set(view_times(runs.views_dir)) == set(runs.times)


def test_table_artifact_has_a_row_per_shard_and_a_total(runs):
    assert runs.table is not None and runs.table.type == "table"
    assert [row["shard"] for row in json.loads(runs.table.data)] == ["00000", "00001", "00002", "total"]


def test_markdown_artifact_links_the_contact_sheet(runs):
    assert runs.sheet is not None and runs.first.result()["contact_sheet"] in runs.sheet.data


def test_new_render_settings_key_a_sibling_directory(tiny_obman, occ_home):
    params = RenderParams(root=tiny_obman, views=2)
    assert plan_render(params).views_dir != plan_render(params.model_copy(update={"views": 3})).views_dir
