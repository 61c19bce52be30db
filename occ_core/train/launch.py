"""Starting a stage as a subprocess: ``python -m occ_core.cli train`` or ``accelerate launch`` on N GPUs.

The train flow's tasks call ``run_stage``. A subprocess keeps the trainer's memory, CUDA context and
process group out of the orchestrator, and makes a retry simply the same command again, which
resumes from the newest complete checkpoint (occ_core.train.checkpoint). Stage outputs live under
``OCC_HOME/train/<stage>-<run_key>``, so an unchanged stage maps to a finished folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from occ_core.config import Settings
from occ_core.stage import stage_dir
from occ_core.train.checkpoint import read_card
from occ_core.train.config import TrainConfig

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "deployments" / "accelerate"
# NVLink multicast can take a shared host's GPUs out of service; every launched process keeps it off.
NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CONFIG_FILE = "train_config.json"


class LaunchConfig(BaseModel):
    """How a training stage is started."""

    model_config = ConfigDict(frozen=True)

    launcher: Literal["python", "accelerate"] = Field(
        "python", description="python: one process (CPU or one GPU); accelerate: accelerate launch"
    )
    accelerate_config: str = Field(
        "1gpu", description="a file under deployments/accelerate (without .yaml) or a path to one"
    )
    num_processes: int | None = Field(None, ge=1, description="processes (GPUs); default: the config file's")


class TrainingFailed(RuntimeError):
    """The training subprocess exited with an error; ``retryable`` is False for occ's own input errors."""

    def __init__(self, returncode: int, tail: str) -> None:
        super().__init__(f"training exited with code {returncode}: {tail}")
        self.returncode = returncode
        # 1: occ reported bad input or a refused output; 2: a usage error. Neither passes on a retry.
        self.retryable = returncode not in (1, 2)


def stage_out(cfg: TrainConfig, settings: Settings | None = None) -> TrainConfig:
    """``cfg`` with OUT at ``OCC_HOME/train/<stage>-<run_key>`` (the key of its data, init, settings)."""
    from occ_core.train.run import identity_of

    run_key = identity_of(cfg)["run_key"]
    return cfg.model_copy(update={"out": stage_dir("train", f"{cfg.stage}-{run_key}", settings)})


def command(cfg: TrainConfig, launch: LaunchConfig, config_file: Path, folds: int = 0) -> list[str]:
    """The command line of one stage: every setting travels in ``config_file`` (a TrainConfig as JSON)."""
    occ = [
        "-m",
        "occ_core.cli",
        "train",
        "--stage",
        cfg.stage,
        "--preset",
        cfg.preset,
        "--data",
        str(cfg.data),
        "--out",
        str(cfg.out),
        "--config",
        str(config_file),
    ]
    if cfg.init is not None:
        occ += ["--init", str(cfg.init)]
    if folds:
        occ += ["--folds", str(folds)]
    if launch.launcher == "python":
        return [sys.executable, *occ]
    config = Path(launch.accelerate_config)
    if not config.suffix:
        config = ACCELERATE_CONFIGS / f"{launch.accelerate_config}.yaml"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if launch.num_processes:
        accelerate += ["--num_processes", str(launch.num_processes)]
    return [*accelerate, *occ]


def run_stage(cfg: TrainConfig, launch: LaunchConfig, folds: int = 0) -> dict[str, Any]:
    """Run one stage to completion in a subprocess and return its model card.

    Raises:
        TrainingFailed: The subprocess failed (``retryable`` says whether the same command may pass).
    """
    from occ_core.train.crossfit import FOLDS_DIR, PREDICTIONS
    from occ_core.train.run import finished_card

    out = Path(cfg.out)
    predictions = out / FOLDS_DIR / PREDICTIONS
    finished = finished_card(cfg)
    if finished is not None and (not folds or predictions.is_file()):
        # Nothing to do: no subprocess, no model load (an unchanged re-run trains nothing).
        return {**finished, "cached": True, **({"train_predictions": str(predictions)} if folds else {})}
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / CONFIG_FILE
    config_file.write_text(cfg.model_dump_json(indent=2))
    env = {**os.environ, **NCCL_SAFETY}
    log = out / "train.log"
    with open(log, "ab") as sink:
        result = subprocess.run(
            command(cfg, launch, config_file, folds), stdout=sink, stderr=subprocess.STDOUT, env=env
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:].strip().splitlines()
        raise TrainingFailed(result.returncode, tail[-1] if tail else "(no output)")
    card = read_card(out) or {}
    if folds and predictions.is_file():
        card["train_predictions"] = str(predictions)
    return card
