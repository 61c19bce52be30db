"""``occ train``: one training stage from the command line.

    occ train --stage {vision,sft1,sft2,mpo,sc} --preset P --data DATASETS_DIR [--init CKPT] --out OUT

DATASETS_DIR is a directory written by the datasets stage (for ``--stage vision``: an ObMan root
whose ``rgb_obj`` images and metas are read). OUT receives the final model as a standard Hugging Face
directory with ``occ_card.json`` beside its config, and intermediate checkpoints under
``OUT/checkpoints/``. The same command run again resumes a killed run, or does nothing when OUT is
complete. ``--folds K`` (sft1) also cross-predicts Q1 on the training rows for the model-errors grader;
``--test DIR`` reports Q1 accuracy on a held-out datasets directory (its sft1 rows) afterwards; for
``--stage sc``, attempt-1 and attempt-2 accuracy with fixed/broken counts, of the init and of OUT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from occ_core.config import field_help
from occ_core.errors import StageError
from occ_core.train.config import INIT_OF, TRAIN_STAGES, TrainConfig
from occ_core.train.presets import PRESETS, PresetError

# Flags that map one to one onto TrainConfig fields (help from the field's description).
OVERRIDES: dict[str, Any] = {
    "seed": int,
    "epochs": float,
    "max_steps": int,
    "learning_rate": float,
    "batch_size": int,
    "grad_accum": int,
    "weight_decay": float,
    "max_length": int,
    "beta": float,
    "save_steps": int,
    "logging_steps": int,
    "dataloader_workers": int,
    "sc_samples": int,
    "sc_temperature": float,
    "sc_max_new_tokens": int,
    "sc_kl_weight": float,
    "sc_improvement_bonus": float,
    "sc_reference_weight": float,
    "sc_reask": click.Choice(["conversation", "rewrite"]),
    "sc_phases": click.Choice(["both", "two-phase"]),
}


def _overrides(command: click.Command) -> click.Command:
    for name, kind in reversed(OVERRIDES.items()):
        command = click.option(
            "--" + name.replace("_", "-"), name, type=kind, default=None, help=field_help(TrainConfig, name)
        )(command)
    return command


@click.command("train")
@click.option("--stage", type=click.Choice(TRAIN_STAGES), required=True, help="training stage")
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default="tiny",
    show_default=True,
    help=field_help(TrainConfig, "preset"),
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help=field_help(TrainConfig, "data") + " (vision: an ObMan root)",
)
@click.option("--init", type=click.Path(path_type=Path), default=None, help=field_help(TrainConfig, "init"))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help=field_help(TrainConfig, "out"),
)
@click.option("--dataset", default=None, help=field_help(TrainConfig, "dataset"))
@click.option(
    "--vision",
    type=click.Choice(["frozen", "last", "full"]),
    default=None,
    help=field_help(TrainConfig, "vision"),
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help=field_help(TrainConfig, "device"),
)
@click.option("--bf16/--no-bf16", default=None, help=field_help(TrainConfig, "bf16"))
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=False,
    help=field_help(TrainConfig, "gradient_checkpointing"),
)
@click.option(
    "--folds",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="sft1: also cross-predict Q1 on the training rows with K fold models (0: off)",
)
@click.option(
    "--test",
    "test_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="datasets directory of a held-out split: report Q1 accuracy on its sft1 rows (sc: attempt-1 "
    "and attempt-2 accuracy on its sc rows, of the init and of the SC model)",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="a TrainConfig as JSON (as the train flow writes it); flags given override it",
)
@_overrides
def cli(
    stage: str, data: Path, out: Path, folds: int, test_dir: Path | None, config_file: Path | None, **options
) -> None:
    """Train one stage (vision, sft1, sft2, mpo, sc) and write a standard HF model with its card."""
    if stage == "vision":
        from occ_core.train.vision import vision_command

        click.get_current_context().invoke(  # the tower's own command: occ_core.train.vision
            vision_command,
            data=(data,),
            out=out,
            seed=options["seed"] or 0,
            device=options["device"],
            **({"steps": options["max_steps"]} if (options["max_steps"] or 0) > 0 else {}),
        )
        return
    from occ_core.train import data as data_module
    from occ_core.train.run import load_training, train

    ctx = click.get_current_context()
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    fields = json.loads(config_file.read_text()) if config_file else {}
    fields.update({k: v for k, v in given.items() if v is not None}, stage=stage, data=data, out=out)
    if stage in INIT_OF and fields.get("init") is None:
        raise click.UsageError(f"--stage {stage} needs --init (the {INIT_OF[stage]} output)")
    cfg = TrainConfig(**fields)
    if folds and stage != "sft1":
        raise click.UsageError("--folds applies to --stage sft1 only")
    try:
        training = load_training(cfg)
        card = train(cfg, training=training)
        report = {
            "out": str(Path(out).resolve()),
            "stage": stage,
            "final_step": card["final_step"],
            "cached": card["cached"],
            "first_loss": card["metrics"]["first_loss"],
            "last_loss": card["metrics"]["last_loss"],
        }
        if folds:
            from occ_core.train.crossfit import FOLDS_DIR, cross_predict

            report["cross_prediction"] = cross_predict(cfg, training, folds, Path(out) / FOLDS_DIR)
        if test_dir is not None and stage == "sc":
            from occ_core.train.sc import evaluate_two_attempts

            test = data_module.load_sft(test_dir, cfg.dataset_name)
            report["test_two_attempts"] = {
                model: evaluate_two_attempts(path, test, cfg.preset, cfg.sc_reask)
                for model, path in (("init", cfg.init), ("sc", out))
            }
        elif test_dir is not None:
            from occ_core.train.predict import evaluate_q1

            report["test_q1"] = evaluate_q1(out, data_module.load_sft(test_dir, "sft1"), cfg.preset)
    except (StageError, PresetError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report))
