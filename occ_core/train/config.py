"""``TrainConfig``: the settings of one training stage, each with its documented default.

Fields left at None take the preset's default for the stage (occ_core.train.presets), so a
command line names only what it changes. The resolved values are recorded in the model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from occ_core.train.presets import VisionPolicy

TRAIN_STAGES: tuple[str, ...] = ("vision", "sft1", "sft2", "mpo", "sc")
# The datasets-stage file each stage trains on (DATASETS_DIR/<name>.parquet).
STAGE_DATASET = {"sft1": "sft1", "sft2": "sft2", "mpo": "pairs", "sc": "sc"}
# The stage whose output a stage starts from (--init), where it cannot start from the base model.
INIT_OF = {"sft2": "SFT1", "mpo": "SFT2", "sc": "MPO"}
Device = Literal["auto", "cpu", "cuda"]


class StageSettings(BaseModel):
    """How one stage trains; every field left at None takes the preset's default for the stage."""

    model_config = ConfigDict(frozen=True)

    seed: int = Field(0, ge=0, description="seed of initialisation, data order and dropout")
    epochs: float | None = Field(None, gt=0, description="passes over the data; default: the preset's")
    max_steps: int = Field(-1, ge=-1, description="stop after this many optimiser steps (-1: epochs decide)")
    learning_rate: float | None = Field(None, gt=0, description="peak learning rate; default: the preset's")
    batch_size: int | None = Field(None, ge=1, description="samples (pairs for mpo) per device and step")
    grad_accum: int | None = Field(None, ge=1, description="micro-batches per optimiser step")
    weight_decay: float | None = Field(None, ge=0, description="AdamW weight decay; default: the preset's")
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="share of steps of linear warm-up (upstream 3%)"
    )
    lr_scheduler: str = Field("cosine", description="learning-rate schedule after warm-up (upstream cosine)")
    vision: VisionPolicy | None = Field(
        None,
        description="vision tower during training: frozen, last (its last layer trains) or full; "
        "default: the preset's (real presets freeze it, as the method does)",
    )
    max_length: int | None = Field(
        None, ge=16, description="longest sample in tokens, image tokens included; None: no limit"
    )
    beta: float = Field(0.1, gt=0, description="MPO: DPO temperature beta")
    loss_weights: tuple[float, float, float] = Field(
        (0.8, 0.2, 1.0), description="MPO: weights of the sigmoid, bco_pair and sft losses (upstream v1)"
    )
    # SC (occ_core.train.sc): the weights are named for what they weigh, not after Adam's betas (upstream).
    sc_samples: int = Field(
        8,
        ge=1,
        description="SC: attempt-1 answers sampled per prompt; their rewards form a leave-one-out "
        "baseline (1: the batch mean)",
    )
    sc_temperature: float = Field(
        0.5, gt=0, description="SC: sampling temperature of both attempts (tiny at 1.0 sampled broken words)"
    )
    sc_max_new_tokens: int = Field(
        12, ge=1, description="SC: longest sampled answer in tokens ('The object is X.' is about 6)"
    )
    sc_kl_weight: float = Field(
        0.1, ge=0, description="SC: weight of the KL penalty (k3, on the sampled tokens) to the frozen init"
    )
    sc_improvement_bonus: float = Field(
        0.1, ge=0, description="SC: alpha; alpha * (r2 - r1) is added to attempt 2's reward (upstream 0.1)"
    )
    sc_reference_weight: float = Field(
        0.0,
        ge=0,
        description="SC: weight of the reference answer's negative log-likelihood after the re-ask (one "
        "second-attempt prompt per row, a wrong first attempt when sampled); an SFT term, as MPO has one",
    )
    sc_reask: Literal["conversation", "rewrite"] = Field(
        "conversation",
        description="SC: attempt 2 sees attempt 1 and the re-ask in one conversation (SCoRe), or the "
        "re-asked question alone (rewrite, as upstream)",
    )
    sc_phases: Literal["both", "two-phase"] = Field(
        "two-phase",
        description="SC: train both attempts throughout, or two-phase (upstream: first half attempt 2 only "
        "with KL on attempt 1, second half both)",
    )
    save_steps: int = Field(50, ge=1, description="optimiser steps between checkpoints under OUT/checkpoints")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept under OUT/checkpoints")
    logging_steps: int = Field(5, ge=1, description="optimiser steps between metric records")
    device: Device = Field("auto", description="cpu, cuda, or auto (cuda when available)")
    bf16: bool | None = Field(None, description="bf16 autocast; default: on for cuda, off for cpu")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory (GPU)")
    attn_implementation: str = Field("sdpa", description="attention kernel: sdpa or eager")
    dataloader_workers: int = Field(0, ge=0, description="processes that decode and collate batches")


class TrainConfig(StageSettings):
    """One stage of ``occ train``: what to train, from what, on which data, into which folder."""

    stage: Literal["sft1", "sft2", "mpo", "sc"] = Field(description="training stage: sft1, sft2, mpo or sc")
    preset: str = Field("tiny", description="model preset: tiny, internvl-1b, -2b, -4b or -8b")
    data: Path = Field(description="a directory written by the datasets stage (sft1/sft2/pairs files)")
    init: Path | None = Field(
        None,
        description="checkpoint to start from (sft2: the SFT1 output, mpo: the SFT2 output, sc: the MPO "
        "output; for mpo and sc also the frozen reference); sft1 defaults to the preset's base model",
    )
    out: Path | None = Field(
        None,
        description="output folder: final HF model + occ_card.json, checkpoints/ inside; the train flow "
        "picks OCC_HOME/train/<stage>-<run_key>",
    )
    dataset: str | None = Field(
        None,
        description="file of DATA to train on (name without .jsonl); default by stage: sft1, sft2, pairs, sc",
    )

    @model_validator(mode="after")
    def _init_required(self) -> TrainConfig:
        if self.stage in INIT_OF and self.init is None:
            raise ValueError(f"stage {self.stage} needs --init (the {INIT_OF[self.stage]} output)")
        return self

    @property
    def out_dir(self) -> Path:
        """OUT, which a stage cannot run without."""
        if self.out is None:
            raise ValueError(f"stage {self.stage}: no output folder (--out)")
        return Path(self.out).expanduser().resolve()

    @property
    def dataset_name(self) -> str:
        return self.dataset or STAGE_DATASET[self.stage]
