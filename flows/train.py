"""The train flow: SFT1, clarity labels from SFT1's own errors, SFT2, MPO, SC; each scored on test.

Run::

    python -m flows.train --root ROOT --renders VIEWS_DIR --test-data TEST_DATASETS_DIR [--preset tiny]

or call ``train_flow(TrainParams(...))`` from another flow (the demo does). The steps, as the method
trains:

1. the datasets stage on the train split (cached: the demo has already run it) gives the SFT1 rows;
2. SFT1 trains, and ``folds`` fold models cross-predict Q1 on the training images (a model does not
   grade images it trained on);
3. the datasets stage runs again with those answers and the model-errors grader: SFT2, the balanced
   set and the pairs now say "unclear" where SFT1 was wrong;
4. SFT2 trains from SFT1, MPO from SFT2 (its frozen reference), SC from MPO (its frozen reference);
5. every stage's model answers Q1 on the held-out test split, next to chance and the majority class,
   and MPO and SC answer it twice (the re-ask of self-correction): attempt 1 and 2 before and after SC.

Each stage is a ``gpu``-tagged task in a subprocess, cached on its data, init and settings, and retried
with resume (tasks.train). An unchanged re-run trains nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click
from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.datasets import datasets_flow
from occ_core.config import field_help
from occ_core.datasets import DatasetsConfig
from occ_core.train.config import StageSettings, TrainConfig
from occ_core.train.launch import LaunchConfig
from tasks.train import plan_stage, q1_accuracy, train_stage, two_attempts


class TrainParams(BaseModel):
    """The train flow's form: the train split's datasets, the test split, the preset and each stage."""

    model_config = ConfigDict(frozen=True)

    datasets: DatasetsConfig = Field(
        description="datasets stage of the train split (its SFT1 rows train SFT1)"
    )
    test_data: Path | None = Field(
        None, description="datasets directory of the held-out split; every stage is scored on its Q1 rows"
    )
    preset: str = Field("tiny", description="model preset: tiny, internvl-1b, -2b, -4b or -8b")
    folds: int = Field(2, ge=2, description="SFT1 fold models that cross-predict the training images")
    grader: Literal["model-errors", "combined"] = Field(
        "model-errors",
        description="clarity grader of SFT2 and MPO: SFT1's errors (the method's) or combined",
    )
    sft1: StageSettings = Field(default_factory=StageSettings, description="SFT1 settings")
    sft2: StageSettings = Field(default_factory=StageSettings, description="SFT2 settings")
    mpo: StageSettings = Field(default_factory=StageSettings, description="MPO settings")
    sc: StageSettings | None = Field(
        default_factory=StageSettings, description="self-correction settings; None: stop after MPO"
    )
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="how each stage is started")


def stage_config(params: TrainParams, stage: str, data: Path, init: Path | None) -> TrainConfig:
    """One stage's TrainConfig from the flow's settings for it (OUT is planned by the task)."""
    settings: StageSettings = getattr(params, stage)
    return TrainConfig(**settings.model_dump(), stage=stage, preset=params.preset, data=data, init=init)


@flow(name="train", log_prints=True)
def train_flow(params: TrainParams) -> dict[str, Any]:
    """datasets -> SFT1 (+ cross-prediction) -> datasets with model errors -> SFT2 -> MPO -> SC -> test."""
    first = datasets_flow(params.datasets)
    sft1 = plan_stage(stage_config(params, "sft1", Path(first["out_dir"]), None))
    sft1_card = train_stage(sft1, params.launch, folds=params.folds)
    relabelled = datasets_flow(
        params.datasets.model_copy(
            update={
                "grader": params.datasets.grader.model_copy(update={"name": params.grader}),
                "predictions": Path(sft1_card["train_predictions"]),
            }
        )
    )
    data = Path(relabelled["out_dir"])
    sft2 = plan_stage(stage_config(params, "sft2", data, Path(sft1.out)))
    sft2_card = train_stage(sft2, params.launch)
    mpo = plan_stage(stage_config(params, "mpo", data, Path(sft2.out)))
    mpo_card = train_stage(mpo, params.launch)
    stages = {"sft1": (sft1, sft1_card), "sft2": (sft2, sft2_card), "mpo": (mpo, mpo_card)}
    if params.sc is not None:
        sc = plan_stage(stage_config(params, "sc", data, Path(mpo.out)))
        stages["sc"] = (sc, train_stage(sc, params.launch))
    summary: dict[str, Any] = {
        "datasets": str(data),
        "unclear": relabelled["unclear"],
        "stages": {
            name: {
                "out": str(cfg.out),
                "final_step": card["final_step"],
                "cached": card.get("cached", False),
                "first_loss": card["metrics"]["first_loss"],
                "last_loss": card["metrics"]["last_loss"],
            }
            for name, (cfg, card) in stages.items()
        },
        "test_q1": {},
        "test_two_attempts": {},
    }
    if params.test_data is not None:
        for name, (cfg, _) in stages.items():
            summary["test_q1"][name] = q1_accuracy(Path(cfg.out), params.test_data, params.preset, name)
        if "sc" in stages:
            reask = stages["sc"][0].sc_reask
            for name in ("mpo", "sc"):
                summary["test_two_attempts"][name] = two_attempts(
                    Path(stages[name][0].out), params.test_data, params.preset, name, reask
                )
        create_table_artifact(
            key="train-test-q1",
            table=[
                {"stage": name, **{k: report[k] for k in ("n", "accuracy", "chance", "majority_rate")}}
                for name, report in summary["test_q1"].items()
            ],
            description=f"{params.preset}: Q1 accuracy of each stage on {params.test_data}",
        )
    for line in summary_lines(summary):
        print(line)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """One line per stage: its output, steps, loss, and its test Q1 accuracy against the baselines;
    then attempt 1 and attempt 2 of self-correction before (MPO) and after SC."""
    lines = []
    for name, stage in summary["stages"].items():
        line = (
            f"  {name:<5} {stage['out']} (step {stage['final_step']}, loss {stage['first_loss']:.3f} -> "
            f"{stage['last_loss']:.3f}{', cached' if stage['cached'] else ''})"
        )
        test = summary["test_q1"].get(name)
        if test:
            line += (
                f"; test Q1 {test['accuracy']:.3f} on {test['n']} (chance {test['chance']:.3f}, "
                f"majority {test['majority_rate']:.3f}, {test['accuracy'] / test['majority_rate']:.2f}x)"
            )
        lines.append(line)
    for name, report in summary.get("test_two_attempts", {}).items():
        noise = "beyond" if report["p_value"] < 0.05 else "within"
        lines.append(
            f"  {'before SC' if name == 'mpo' else 'after SC'} ({name}): attempt 1 {report['attempt1']:.3f}, "
            f"attempt 2 {report['attempt2']:.3f} on {report['n']} (re-ask fixed {report['fixed']}, "
            f"broke {report['broken']}; sign test p {report['p_value']:.3f}: {noise} noise)"
        )
    return lines


@click.command()
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help=field_help(DatasetsConfig, "root"),
)
@click.option(
    "--renders",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=field_help(DatasetsConfig, "renders"),
)
@click.option(
    "--test-data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=field_help(TrainParams, "test_data"),
)
@click.option("--preset", default="tiny", show_default=True, help=field_help(TrainParams, "preset"))
@click.option("--folds", default=2, show_default=True, help=field_help(TrainParams, "folds"))
@click.option("--seed", default=0, show_default=True, help="seed of the datasets and of every stage")
def cli(root: Path, renders: Path | None, test_data: Path | None, preset: str, folds: int, seed: int) -> None:
    """Train SFT1 -> SFT2 -> MPO -> SC on the train split of ROOT and score each stage on the test split."""
    stage = StageSettings(seed=seed)
    train_flow(
        TrainParams(
            datasets=DatasetsConfig(root=root, split="train", renders=renders, seed=seed),
            test_data=test_data,
            preset=preset,
            folds=folds,
            sft1=stage,
            sft2=stage,
            mpo=stage,
            sc=stage,
        )
    )


if __name__ == "__main__":
    cli()
