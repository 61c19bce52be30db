"""The render flow: ObMan samples of one split -> object meshes -> hand-free views (view 0 + orbit).

Run::

    python -m flows.render --root ROOT --split test --backend depth --views 8

or call ``render_flow(RenderParams(root=...))`` from another flow (the demo does, after ingest). The
returned summary holds ``views_dir`` (MOHO-named PNGs) and ``contact_sheet``. Shards run in parallel on
the flow's task runner and are cached on their stage keys; see moho_bridge/pipeline.py for the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from prefect import flow

from moho_bridge.cli import split_name
from moho_bridge.pipeline import RenderParams
from moho_bridge.protocol import BACKENDS
from occ_core.config import field_help
from tasks.render import plan_render, render_shard, summarize_render

__all__ = ["RenderParams", "render_flow"]


@flow(name="render", log_prints=True)
def render_flow(params: RenderParams) -> dict[str, Any]:
    """Plan the shards, reconstruct and render each, then summarise (table + contact sheet artifacts)."""
    plan = plan_render(params)
    # MOHO runs on a GPU: a concurrency limit on the "gpu" tag keeps shards from sharing one.
    shard_task = (
        render_shard.with_options(tags={"cpu", "render", "gpu"}) if params.backend == "moho" else render_shard
    )
    rerender = shard_task.with_options(refresh_cache=True)  # outputs gone: do not trust the cache
    reports = [
        (shard_task if shard.index in plan.done else rerender).submit(shard, params, plan.views_dir)
        for shard in plan.shards
    ]
    summary = summarize_render(reports, plan, params)
    print(
        f"{summary['rendered']} rendered, {summary['skipped']} skipped, {summary['failed']} failed "
        f"-> {plan.views_dir}"
    )
    return summary


@click.command()
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help=field_help(RenderParams, "root"),
)
@click.option(
    "--split", default="test", show_default=True, callback=split_name, help=field_help(RenderParams, "split")
)
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default="depth",
    show_default=True,
    help=field_help(RenderParams, "backend"),
)
@click.option("--views", type=int, default=8, show_default=True, help=field_help(RenderParams, "views"))
@click.option(
    "--shard-size", type=int, default=200, show_default=True, help=field_help(RenderParams, "shard_size")
)
def cli(root: Path, split: str, backend: str, views: int, shard_size: int) -> None:
    """Run the render flow on one split and print its summary."""
    summary = render_flow(
        RenderParams(root=root, split=split, backend=backend, views=views, shard_size=shard_size)
    )
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    cli()
