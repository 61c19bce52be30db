"""The evaluate flow: every stage's model through the method's protocol, with each fallback backend.

Run::

    python -m flows.evaluate --checkpoint sft2=DIR --checkpoint mpo=DIR --test-data TEST_DATASETS_DIR \
        --views depth=VIEWS_DIR --views oracle=VIEWS_DIR

or call ``evaluate_flow(EvaluateParams(...))`` from another flow (the demo does). Per stage and backend:
Q1 on each test image, the clarity question as the second turn, and Q1 again on the view-0 render
(hand-free) where the model says it cannot see clearly (occ_core.evaluate.infer); then the scores
(description, reflection, decision, 3D plus: occ_core.evaluate.score). The report puts every stage and
backend side by side with the paper's table as reference rows (occ_core.evaluate.report), and the
promotion gate checks the method's claim that MPO beats SFT2 on decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from occ_core.config import field_help
from occ_core.evaluate.infer import InferConfig
from occ_core.splits import SplitName
from tasks.evaluate import evaluate_checkpoint, publish_report

STAGE_ORDER = ("base", "sft1", "sft2", "mpo", "sc")


class EvaluateParams(BaseModel):
    """The evaluate flow's form: the models, the test split and its renders, the protocol, the gate."""

    model_config = ConfigDict(frozen=True)

    checkpoints: dict[str, Path] = Field(
        description="stage name (base, sft1, sft2, mpo, sc) -> model directory; scored in that order"
    )
    test_data: Path = Field(
        description="datasets directory of the held-out split: its Q1 rows are the test set"
    )
    views: dict[str, Path] = Field(
        description="fallback backend (depth, oracle, moho) -> view-0 render directory of the test split"
    )
    split: SplitName = Field("test", description="split name in the render file names")
    infer: InferConfig = Field(default_factory=InferConfig, description="how the protocol is run")
    gate: Literal["fail", "warn", "off"] = Field(
        "warn", description="when MPO does not beat SFT2 on decision: fail the flow, warn, or do not check"
    )
    gate_backend: str = Field("oracle", description="backend whose decision score the gate compares")
    examples: int = Field(4, ge=0, description="test images in each report's strip of examples")


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: EvaluateParams) -> dict[str, Any]:
    """Each stage x backend through the protocol, then the report, its artifacts and the gate."""
    stages = sorted(params.checkpoints, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99)
    # One after the other: loading models in parallel threads is not safe in transformers, and the
    # first backend of a stage leaves its Q1 and clarity answers for the next to reuse.
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for stage in stages:
        for backend, views in params.views.items():
            results.setdefault(stage, {})[backend] = evaluate_checkpoint(
                params.checkpoints[stage], stage, backend, params.test_data, views, params.split, params.infer
            )
    report = publish_report(
        results,
        params.test_data,
        params.gate,
        params.gate_backend if params.gate_backend in params.views else next(iter(params.views)),
        params.examples,
    )
    for line in report_lines(report):
        print(line)
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The score table as log lines, the method's claims checked, the gate's verdict, where it is."""
    lines = [
        f"  {'stage':<5} {'backend':<7} {'description':>11} {'reflection':>10} {'decision':>8} {'3D plus':>7}"
    ]
    for row in report["rows"]:
        lines.append(
            f"  {row['stage']:<5} {row['backend']:<7} {_num(row['description']):>11} "
            f"{_num(row['reflection']):>10} {_num(row['decision']):>8} {_num(row['three_d_plus']):>7}"
        )
    lines += [f"  {claim}" for claim in report["claims"]]
    lines.append(f"  promotion gate: {report['gate']['message']}")
    lines.append(f"  report: {report['dir']}/report.md")
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Path]:
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not Path(path).is_dir():
            raise click.BadParameter(
                f"expected NAME=DIRECTORY (an existing directory), got {value!r}", ctx, param
            )
        pairs[name] = Path(path)
    return pairs


@click.command()
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    required=True,
    callback=_pairs,
    help=field_help(EvaluateParams, "checkpoints") + " (STAGE=DIR, repeated)",
)
@click.option(
    "--test-data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help=field_help(EvaluateParams, "test_data"),
)
@click.option(
    "--views",
    multiple=True,
    required=True,
    callback=_pairs,
    help=field_help(EvaluateParams, "views") + " (BACKEND=DIR, repeated)",
)
@click.option("--split", default="test", show_default=True, help=field_help(EvaluateParams, "split"))
@click.option(
    "--gate",
    type=click.Choice(["fail", "warn", "off"]),
    default="warn",
    show_default=True,
    help=field_help(EvaluateParams, "gate"),
)
def cli(checkpoints: dict[str, Path], test_data: Path, views: dict[str, Path], split: str, gate: str) -> None:
    """Score each checkpoint with each backend's renders on the test split; write the report."""
    evaluate_flow(
        EvaluateParams(checkpoints=checkpoints, test_data=test_data, views=views, split=split, gate=gate)
    )


if __name__ == "__main__":
    cli()
