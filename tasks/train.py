"""Prefect tasks of the training stages: a subprocess per stage, tagged ``gpu``, retried with resume.

A stage task is cached on the stage's run key (its data, init and settings fingerprints and the
code version) while its output folder holds a complete model: an unchanged re-run trains nothing,
and a deleted output is trained again. A failed run is retried with the same command, which resumes
from the newest complete checkpoint; occ's own input errors (exit 1 or 2) are not retried. Create
the ``gpu`` tag limit once per server (``prefect concurrency-limit create gpu 1``) so that one
training runs per GPU worker at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import CacheKeyFnPolicy

from occ_core.train import launch, metrics
from occ_core.train.checkpoint import fingerprint, read_card
from occ_core.train.config import TrainConfig
from occ_core.train.launch import LaunchConfig, TrainingFailed


def _stage_key(context: Any, parameters: dict[str, Any]) -> str | None:
    cfg: TrainConfig = parameters["cfg"]
    card = read_card(cfg.out)
    return f"train-{cfg.stage}-{card['run_key']}-{parameters.get('folds', 0)}" if card else None


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    error = state.result(raise_on_failure=False)
    return not isinstance(error, TrainingFailed) or error.retryable


@task(name="base-model", tags=["cpu"])
def base_model_dir(preset: str, seed: int = 0) -> Path:
    """The preset's untrained base as a model directory (the tiny one is saved once), to score it."""
    from occ_core.config import get_settings
    from occ_core.train.model import base_checkpoint
    from occ_core.train.presets import get_preset

    return base_checkpoint(get_preset(preset), get_settings().models, seed)


@task(name="plan-train-stage", tags=["cpu"])
def plan_stage(cfg: TrainConfig) -> TrainConfig:
    """The stage's output folder, named by its run key."""
    return launch.stage_out(cfg)


@task(
    name="train-stage",
    task_run_name="train-{cfg.stage}",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_stage_key),
    persist_result=True,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_worth_retrying,
    tags=["gpu"],
)
def train_stage(cfg: TrainConfig, launch_cfg: LaunchConfig, folds: int = 0) -> dict[str, Any]:
    """Train one stage in a subprocess; publish its metrics table and loss curve."""
    card = launch.run_stage(cfg, launch_cfg, folds)
    records = metrics.read_records(Path(cfg.out))
    create_table_artifact(
        key=f"train-{cfg.stage}-metrics",
        table=metrics.table_rows(records) or [{"step": card.get("final_step")}],
        description=f"{cfg.preset} {cfg.stage}: loss, lr, grad norm per logged step ({cfg.out})",
    )
    create_markdown_artifact(
        key=f"train-{cfg.stage}-curve",
        markdown=f"**{cfg.preset} {cfg.stage}** -> `{cfg.out}`\n\n"
        f"Loss curve: `{card['metrics']['loss_curve']}`; "
        f"steps {card['final_step']}, loss {card['metrics']['first_loss']:.4f} -> "
        f"{card['metrics']['last_loss']:.4f}, TensorBoard: `{Path(cfg.out) / 'tensorboard'}`",
    )
    return card


def _test_key(parameters: dict[str, Any], *modules: Any) -> str:
    """The model's weights, the test rows and the code of ``modules``, which compute the report: an edit
    there (a new field, say) is not served a report cached before it."""
    from occ_core.stage import code_version
    from occ_core.train import data
    from occ_core.train.run import data_fingerprint

    test = data.load_sft(parameters["test_data"], "sft1")
    return f"{fingerprint(parameters['model_dir'])[:16]}-{data_fingerprint(test)}-{code_version(*modules)}"


def _accuracy_key(context: Any, parameters: dict[str, Any]) -> str:
    from occ_core.train import predict

    return f"q1-accuracy-{_test_key(parameters, predict)}"


@task(
    name="q1-accuracy",
    task_run_name="q1-accuracy-{stage}",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_accuracy_key),
    persist_result=True,
    tags=["gpu"],
)
def q1_accuracy(model_dir: Path, test_data: Path, preset: str, stage: str) -> dict[str, Any]:
    """Q1 accuracy of a stage's model on the held-out split's SFT1 rows."""
    from occ_core.train import data
    from occ_core.train.predict import evaluate_q1

    return {"stage": stage, **evaluate_q1(model_dir, data.load_sft(test_data, "sft1"), preset)}


def _two_attempts_key(context: Any, parameters: dict[str, Any]) -> str:
    from occ_core.train import predict, sc

    return f"two-attempts-{parameters['reask']}-{_test_key(parameters, predict, sc)}"


@task(
    name="two-attempt-accuracy",
    task_run_name="two-attempts-{stage}",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_two_attempts_key),
    persist_result=True,
    tags=["gpu"],
)
def two_attempts(model_dir: Path, test_data: Path, preset: str, stage: str, reask: str) -> dict[str, Any]:
    """Greedy attempt-1 and attempt-2 (re-asked) Q1 accuracy on the held-out Q1 rows, fixed and broken."""
    from occ_core.train import data
    from occ_core.train.sc import evaluate_two_attempts

    test = data.load_sft(test_data, "sft1")
    return {"stage": stage, **evaluate_two_attempts(model_dir, test, preset, reask)}
