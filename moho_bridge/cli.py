"""``occ reconstruct`` and ``occ render``: from ObMan samples to meshes, and to hand-free views.

    occ reconstruct --root ROOT --split test --backend depth --out OUT
    occ render --root ROOT --split test --backend depth --views 8 --out VIEWS
    python -m moho_bridge.cli probe          # can the real MOHO run here? (MOHO_HOME, MOHO_PYTHON, MOHO_CKPT)

Both print a JSON summary. Without ``--out`` they write under ``OCC_HOME/{reconstruct,render}/{key}``
(see moho_bridge/pipeline.py); a re-run with the same inputs and settings finds its work done.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from moho_bridge.pipeline import MohoOptions, ReconstructParams, RenderParams, reconstruct_split, render_split
from moho_bridge.protocol import BACKENDS
from occ_core.config import field_help
from occ_core.errors import StageError
from occ_core.splits import check_split


def split_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Click callback of ``--split``: the value when it is a split name (occ_core.splits), else a usage
    error naming the option, before anything is read or written."""
    try:
        return check_split(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _input_options(command: Callable) -> Callable:
    """Options shared by reconstruct and render: the samples, the backend and its settings."""
    options = [
        click.option(
            "--root",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            required=True,
            help=field_help(ReconstructParams, "root"),
        ),
        click.option(
            "--split",
            default="test",
            show_default=True,
            callback=split_name,
            help=field_help(ReconstructParams, "split"),
        ),
        click.option(
            "--backend",
            type=click.Choice(list(BACKENDS)),
            default="depth",
            show_default=True,
            help=field_help(ReconstructParams, "backend"),
        ),
        click.option("--limit", type=int, default=None, help=field_help(ReconstructParams, "limit")),
        click.option(
            "--depth-convention",
            type=click.Choice(["writer", "reader"]),
            default=None,
            help=field_help(ReconstructParams, "depth_convention"),
        ),
        click.option(
            "--shapenet-root",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help=field_help(ReconstructParams, "shapenet_root"),
        ),
        click.option(
            "--moho-home", type=click.Path(path_type=Path), default=None, help=field_help(MohoOptions, "home")
        ),
        click.option(
            "--moho-python",
            type=click.Path(path_type=Path),
            default=None,
            help=field_help(MohoOptions, "python"),
        ),
        click.option(
            "--moho-ckpt", type=click.Path(path_type=Path), default=None, help=field_help(MohoOptions, "ckpt")
        ),
        click.option("--gpu", default="0", show_default=True, help=field_help(MohoOptions, "gpu")),
        click.option(
            "--device",
            type=click.Choice(["cuda", "cpu"]),
            default="cuda",
            show_default=True,
            help=field_help(MohoOptions, "device"),
        ),
        click.option(
            "--moho-timeout",
            type=float,
            default=3600.0,
            show_default=True,
            help=field_help(MohoOptions, "timeout_s"),
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _params(model: type[ReconstructParams], values: dict[str, Any]) -> Any:
    """Build ``model`` from the command's options (the moho ones nest under ``moho``)."""
    moho = MohoOptions(
        home=values.pop("moho_home"),
        python=values.pop("moho_python"),
        ckpt=values.pop("moho_ckpt"),
        gpu=values.pop("gpu"),
        device=values.pop("device"),
        timeout_s=values.pop("moho_timeout"),
    )
    return model(moho=moho, **values)


@click.command("reconstruct")
@_input_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for {id}.ply and manifest.parquet (default: OCC_HOME/reconstruct/<key>).",
)
def reconstruct(out: Path | None, **values: Any) -> None:
    """Reconstruct an object mesh (object frame) per sample of a split, with its pose and status."""
    params = _params(ReconstructParams, values)
    try:
        out_dir, report = reconstruct_split(params, out)
    except StageError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({**report.summary(), "backend": params.backend, "out": str(out_dir)}))


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated degrees, got {text!r}") from None


@click.command("render")
@_input_options
@click.option("--views", type=int, default=8, show_default=True, help=field_help(RenderParams, "views"))
@click.option(
    "--elevations",
    "elevations_deg",
    default="30,-30",
    show_default=True,
    callback=lambda ctx, param, value: _floats(value),
    help="comma-separated " + field_help(RenderParams, "elevations_deg"),
)
@click.option("--size", type=int, default=256, show_default=True, help=field_help(RenderParams, "size"))
@click.option(
    "--shard-size", type=int, default=200, show_default=True, help=field_help(RenderParams, "shard_size")
)
@click.option("--renderer", default="pyrender", show_default=True, help=field_help(RenderParams, "renderer"))
@click.option(
    "--processes", type=click.IntRange(min=1), default=None, help=field_help(RenderParams, "processes")
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for the views, meshes/, quarantine.jsonl and contact_sheet.png "
    "(default: OCC_HOME/render/<key>).",
)
def render(**values: Any) -> None:
    """Reconstruct what is missing, then render view 0 and orbit views of every sample of a split."""
    params = _params(RenderParams, values)
    try:
        summary = render_split(params)
    except StageError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary))


@click.command("probe")
@click.option(
    "--moho-home", type=click.Path(path_type=Path), default=None, help=field_help(MohoOptions, "home")
)
@click.option(
    "--moho-python", type=click.Path(path_type=Path), default=None, help=field_help(MohoOptions, "python")
)
@click.option(
    "--moho-ckpt", type=click.Path(path_type=Path), default=None, help=field_help(MohoOptions, "ckpt")
)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
def probe(moho_home: Path | None, moho_python: Path | None, moho_ckpt: Path | None, device: str) -> None:
    """Say whether the real MOHO can run here, and why not; exit 1 when it cannot."""
    from moho_bridge.moho import MohoInstall
    from moho_bridge.moho import probe as probe_install

    availability = probe_install(MohoInstall.discover(moho_home, moho_python, moho_ckpt), device)
    click.echo(f"{'available' if availability.ok else 'not available'}: {availability.reason}")
    if not availability.ok:
        raise SystemExit(1)


cli = click.Group("moho_bridge", help="Reconstruction backends (moho, depth, oracle).")
for _command in (reconstruct, render, probe):
    cli.add_command(_command)

if __name__ == "__main__":
    cli()
