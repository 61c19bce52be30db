"""``occ evaluate``: score prediction files, or run the method's protocol on a checkpoint and score it.

    occ evaluate score --predictions P.jsonl --truth T.jsonl
    occ evaluate run --checkpoint C --root ROOT --split test --views V [--out DIR]
    occ evaluate run --checkpoint C --data DATASETS_DIR --split test --views V [--out DIR]

Both print the scores as one JSON object on stdout. ``score`` writes them beside P
(``P-stem.scores.json``) with the upstream predictions format (``P-stem.upstream.json``, ``{id: final
answer}``). ``run`` writes ``predictions.jsonl``, ``truth.jsonl`` and those two files under DIR
(default: ``OCC_HOME/evaluate/<key>``), resuming from the shards a killed run left there.
"""

from __future__ import annotations

from pathlib import Path

import click

from occ_core.config import field_help
from occ_core.errors import StageError
from occ_core.evaluate.infer import InferConfig
from occ_core.evaluate.score import ScoreInputError, dumps_scores
from occ_core.splits import check_split


def _split(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_split(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.group("evaluate")
def cli() -> None:
    """Description, reflection and decision scores (method-spec section 6)."""


@cli.command("score")
@click.option(
    "--predictions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="JSONL rows {id, q1, clarity, q1_3d}; q1 null: image not processed; q1_3d absent/null: not asked",
)
@click.option(
    "--truth",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="JSONL rows {id, answer}, answer 'The object is {class}.'; its ids are the whole test set",
)
def score_command(predictions: Path, truth: Path) -> None:
    """Score prediction rows against the truth; write the scores and upstream predictions beside P."""
    from occ_core.evaluate.score import score_files

    try:
        scores = score_files(predictions, truth)
    except ScoreInputError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(dumps_scores(scores))


def _config_options(command: click.Command) -> click.Command:
    options = [
        click.option(
            "--clarity-prompt",
            type=click.Choice(["inf", "inf2", "train"]),
            default="inf",
            show_default=True,
            help=field_help(InferConfig, "clarity_prompt"),
        ),
        click.option(
            "--fallback",
            type=click.Choice(["no", "all"]),
            default="no",
            show_default=True,
            help=field_help(InferConfig, "fallback"),
        ),
        click.option(
            "--batch-size",
            type=int,
            default=32,
            show_default=True,
            help=field_help(InferConfig, "batch_size"),
        ),
        click.option(
            "--shard-size",
            type=int,
            default=256,
            show_default=True,
            help=field_help(InferConfig, "shard_size"),
        ),
        click.option(
            "--max-new-tokens",
            type=int,
            default=32,
            show_default=True,
            help=field_help(InferConfig, "max_new_tokens"),
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
            help=field_help(InferConfig, "device"),
        ),
        click.option("--preset", default=None, help=field_help(InferConfig, "preset")),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command("run")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="model directory (an occ training OUT or any native InternVL checkpoint)",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="ObMan root: the split's frames, answers from their metas",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="instead of --root: a datasets-stage directory of the split (its sft1 rows)",
)
@click.option(
    "--split", default="test", show_default=True, callback=_split, help="split name in the render file names"
)
@click.option(
    "--views",
    type=click.Path(path_type=Path),
    required=True,
    help="directory of view-0 renders {id}_0_obman_{split}_rgb_{id}.jpg.png",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="output directory [default: OCC_HOME/evaluate/<key of checkpoint, test set, views, settings>]",
)
@_config_options
def run_command(
    checkpoint: Path,
    root: Path | None,
    data: Path | None,
    split: str,
    views: Path,
    out: Path | None,
    **settings: object,
) -> None:
    """Run Q1, clarity and the render fallback on every test image; print and write the scores."""
    from occ_core.evaluate.infer import default_out, evaluate, items_from_dataset, items_from_root
    from occ_core.train.presets import PresetError

    if (root is None) == (data is None):
        raise click.UsageError("give exactly one of --root and --data")
    cfg = InferConfig(**settings)
    try:
        items, excluded = items_from_root(root, split) if root else (items_from_dataset(data), [])
        out = out or default_out(checkpoint, root or data, split, views, cfg)
        scores = evaluate(checkpoint, items, views, split, out, cfg, excluded)
    except (StageError, PresetError, ScoreInputError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(dumps_scores(scores))
