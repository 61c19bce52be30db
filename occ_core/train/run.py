"""One training stage, start to finish: data, pre-flight, model, trainer, resume, final model, card.

``train(cfg)`` is what ``occ train`` and the train flow's tasks call. It is idempotent: an OUT whose
card matches the settings and inputs is returned as is; a killed run resumes from its newest complete
checkpoint and ends at the same final step with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from occ_core import __version__
from occ_core.config import Settings, get_settings
from occ_core.fsio import sha256_file, write_json_atomic
from occ_core.stage import code_version, params_hash
from occ_core.train import checkpoint, data, metrics, model
from occ_core.train.checkpoint import CHECKPOINTS, CheckpointError
from occ_core.train.config import TrainConfig
from occ_core.train.presets import Preset, StageDefaults, get_preset, preset_directory

RUN_FILE = ".occ_run.json"  # settings of the run that owns OUT/checkpoints
FINAL_STAGING = ".final.partial"


def stage_defaults(cfg: TrainConfig, preset: Preset) -> dict[str, Any]:
    """The resolved optimiser settings: the config's where set, else the preset's for the stage."""
    base: StageDefaults = {"mpo": preset.mpo, "sc": preset.sc}.get(cfg.stage, preset.sft)
    return {
        "learning_rate": cfg.learning_rate or base.learning_rate,
        "epochs": cfg.epochs or base.epochs,
        "batch_size": cfg.batch_size or base.batch_size,
        "grad_accum": cfg.grad_accum or base.grad_accum,
        "weight_decay": base.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        "vision": cfg.vision or preset.vision,
    }


def data_fingerprint(training: data.TrainingData) -> str:
    """Content hash of the rows a stage trains on: the JSONL, its meta file and the ids taken from it."""
    import hashlib

    meta = training.path.with_name(training.path.stem + ".meta.json")
    ids = hashlib.sha256("\n".join(sorted(str(r["id"]) for r in training.rows)).encode()).hexdigest()
    return sha256_file(training.path)[:16] + sha256_file(meta)[:16] + ids[:16]


def _code() -> str:
    # The modules that decide what a stage computes; vision.py only makes the shipped tower (fingerprinted).
    from occ_core.train import config, presets, processor, sc, tiny

    return code_version(
        checkpoint, config, data, metrics, model, presets, processor, sc, tiny, sys.modules[__name__]
    )


def _trainer_args(cfg: TrainConfig, resolved: dict[str, Any], out: Path, device: str) -> dict[str, Any]:
    bf16 = (device == "cuda") if cfg.bf16 is None else cfg.bf16
    return {
        "output_dir": str(out / CHECKPOINTS),
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "num_train_epochs": resolved["epochs"],
        "max_steps": cfg.max_steps,
        "learning_rate": resolved["learning_rate"],
        "per_device_train_batch_size": resolved["batch_size"],
        "gradient_accumulation_steps": resolved["grad_accum"],
        "weight_decay": resolved["weight_decay"],
        "warmup_steps": cfg.warmup_ratio,
        "lr_scheduler_type": cfg.lr_scheduler,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "report_to": "none",  # TensorBoard is added as an explicit callback writing under OUT/tensorboard
        "bf16": bf16,
        "tf32": device == "cuda" or None,
        "use_cpu": device == "cpu",
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "dataloader_num_workers": cfg.dataloader_workers,
        "dataloader_persistent_workers": cfg.dataloader_workers > 0,
        "max_length": cfg.max_length,
        "disable_tqdm": True,
        "remove_unused_columns": False,
    }


def build_trainer(
    cfg: TrainConfig, policy: Any, processor: Any, training: data.TrainingData, args: dict[str, Any], ref: Any
) -> Any:
    """trl's SFTTrainer (sft1, sft2: every assistant turn trained), DPOTrainer with the MPO loss, or SC's."""
    if cfg.stage == "sc":
        from occ_core.train.sc import build_sc_trainer

        return build_sc_trainer(cfg, policy, processor, training, args, ref)
    dataset = data.to_dataset(training)
    if cfg.stage == "mpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(
            **args,
            loss_type=["sigmoid", "bco_pair", "sft"],
            loss_weights=list(cfg.loss_weights),
            beta=cfg.beta,
        )
        return DPOTrainer(
            model=policy, ref_model=ref, args=config, train_dataset=dataset, processing_class=processor
        )
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**args, assistant_only_loss=True)
    return SFTTrainer(model=policy, args=config, train_dataset=dataset, processing_class=processor)


def _check_out(out: Path, run: dict[str, Any]) -> dict[str, Any] | None:
    """The card of a finished identical run in OUT, None to train; refuses an OUT of another run."""
    card = checkpoint.read_card(out)
    if card is not None:
        if card.get("run_key") == run["run_key"]:
            return card
        raise CheckpointError(
            f"{out}: holds a model trained with other settings or data (card run_key "
            f"{card.get('run_key')}, this run {run['run_key']}); choose another --out"
        )
    owner = out / RUN_FILE
    if owner.is_file():
        previous = json.loads(owner.read_text())
        if previous.get("run_key") != run["run_key"]:
            raise CheckpointError(
                f"{out}: its checkpoints belong to another run ({owner}); remove them or choose another --out"
            )
    return None


def load_training(cfg: TrainConfig) -> data.TrainingData:
    """The rows of ``cfg.data`` the stage trains on, refused when degenerate."""
    loader = data.load_pairs if cfg.stage == "mpo" else data.load_sft
    training = loader(cfg.data, cfg.dataset_name)
    data.check_not_degenerate(training, cfg.stage)
    return training


def run_identity(cfg: TrainConfig, preset: Preset, training: data.TrainingData) -> dict[str, Any]:
    """What a stage's output depends on, and its hash ``run_key``: same key, same model.

    Raises:
        CheckpointError: ``cfg.init`` is not a complete model directory.
    """
    init_fp = (
        checkpoint.fingerprint(checkpoint.check_model_dir(cfg.init))
        if cfg.init
        else model.base_fingerprint(preset)
    )
    run = {
        "stage": cfg.stage,
        "preset": preset.name,
        "settings": cfg.model_dump(mode="json", exclude={"out", "data", "init", "dataloader_workers"}),
        "resolved": stage_defaults(cfg, preset),
        "data_fingerprint": data_fingerprint(training),
        "init_fingerprint": init_fp,
        "code_version": _code(),
    }
    return {**run, "run_key": params_hash(run)}


def identity_of(cfg: TrainConfig) -> dict[str, Any]:
    """``run_identity`` of a stage read from its config alone (its preset and ``cfg.data``)."""
    return run_identity(cfg, get_preset(cfg.preset), load_training(cfg))


def finished_card(cfg: TrainConfig) -> dict[str, Any] | None:
    """The card in OUT when it holds this very run's complete model, else None.

    Raises:
        CheckpointError: OUT holds a model or checkpoints of another run.
    """
    return _check_out(cfg.out_dir, identity_of(cfg))


def train(
    cfg: TrainConfig, settings: Settings | None = None, training: data.TrainingData | None = None
) -> dict[str, Any]:
    """Run one stage into ``cfg.out`` and return its model card.

    Args:
        cfg: The stage's settings.
        settings: Machine settings (the models folder of the real presets).
        training: Rows to train on instead of ``cfg.data`` (the k-fold SFT1 models of cross-prediction).
    Raises:
        DataError: Missing, malformed or degenerate data, or a sample that cannot be used; before training.
        CheckpointError: ``--init`` is not a complete model, or OUT belongs to another run.
        PresetError: Unknown preset, or a real preset's directory is absent.
    """
    import torch

    settings = settings or get_settings()
    preset = get_preset(cfg.preset)
    base_dir = None if cfg.init or preset.directory is None else preset_directory(preset, settings.models)
    out = cfg.out_dir
    if training is None:
        training = load_training(cfg)
    run = run_identity(cfg, preset, training)
    cached = _check_out(out, run)
    if cached is not None:
        return {**cached, "cached": True}
    resolved = run["resolved"]

    device = model.resolve_device(cfg.device)
    if cfg.init is not None:
        policy, processor = model.load_model(cfg.init, preset, cfg.attn_implementation)
        source = str(Path(cfg.init).resolve())
    else:
        policy, processor, source = model.base_model(preset, base_dir, cfg.seed, cfg.attn_implementation)
    lengths = data.preflight(training, processor, cfg.max_length)
    counts = model.apply_vision_policy(policy, resolved["vision"])
    ref = None
    if cfg.stage in ("mpo", "sc"):
        # The reference is the frozen init (MPO: the SFT2 output, SC: the MPO output), apart from the policy.
        ref, _ = model.load_model(cfg.init, preset, cfg.attn_implementation)
        ref.requires_grad_(False).eval()

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_FILE, {"run_key": run["run_key"]})
    args = _trainer_args(cfg, resolved, out, device)
    trainer = build_trainer(cfg, policy, processor, training, args, ref)
    trainer.add_callback(checkpoint.MarkCompleteCheckpoints())
    trainer.add_callback(_tensorboard(out))
    resume = checkpoint.resume_point(out)
    if resume is not None:
        checkpoint.load_weights(policy, resume)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    curve = metrics.write_metrics(trainer.state.log_history, out, f"{preset.name} {cfg.stage}")
    card = {
        **run,
        "occ_version": __version__,
        "source": source,
        "data": str(training.path),
        "samples": len(training),
        "label_counts": training.label_counts,
        "parameters": counts,
        "device": device,
        "torch": torch.__version__,
        "final_step": trainer.state.global_step,
        "resumed_from": resume.name if resume else None,
        "seconds": round(seconds, 2),
        **metrics.throughput(result.metrics, device),
        "longest_tokens": lengths["longest_tokens"],
        "metrics": curve,
        "command": " ".join(sys.argv),
    }
    staging = out / FINAL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))  # every rank takes part (FSDP gathers); the main process writes
    if trainer.is_world_process_zero():
        checkpoint.publish_final(staging, out, card)
    trainer.accelerator.wait_for_everyone()
    return {**checkpoint.read_card(out), "cached": False}


def _tensorboard(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "tensorboard")))
