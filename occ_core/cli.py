"""The ``occ`` command line: one entry point that dispatches to each stage's own command.

Stage commands are imported only when called, so ``occ ingest`` starts without loading Prefect,
torch or the renderer. Each stage module also runs alone: ``python -m occ_core.synth --help``.
"""

from __future__ import annotations

import importlib
import logging
import os

import click

# name -> (module, attribute, one-line help). The one place that knows every stage command.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("occ_core.synth", "cli", "Generate a synthetic ObMan-format dataset."),
    "s3": ("occ_core.s3server", "cli", "Run a local S3 server (moto) for the embedded default."),
    "ingest": ("occ_core.s3sync", "cli", "Mirror ObMan splits from S3 into a local root."),
    "reconstruct": ("moho_bridge.cli", "reconstruct", "Reconstruct object meshes (moho, depth, oracle)."),
    "render": ("moho_bridge.cli", "render", "Reconstruct and render hand-free views of each object."),
    "cot": ("occ_core.cot", "cli", "Build chain-of-thought JSONL datasets (SFT1, SFT2, CoT, SC)."),
    "pairs": ("occ_core.preference", "cli", "Build preference pairs for MPO from SFT2 rows."),
    "occlusion": ("occ_core.occlusion", "cli", "Calibrate the visibility threshold of the clarity grader."),
    "datasets": (
        "occ_core.datasets",
        "cli",
        "Build every training dataset of one ObMan split, with statistics.",
    ),
    "train": ("occ_core.train.cli", "cli", "Train one stage (vision, sft1, sft2, mpo) into a HF model."),
    "model": ("occ_core.convert", "cli", "Convert the seed's released InternVL2 checkpoints to native HF."),
    "evaluate": ("occ_core.evaluate.cli", "cli", "Evaluate a model (run) or prediction files (score)."),
    "demo": ("flows.demo", "cli", "Run the whole pipeline on the embedded default (no configuration)."),
}


# Prefect reads its settings when first imported, so these go into the environment before a stage
# module loads it. A user's own values win. The temporary API server needs more than Prefect's default
# 20 s to migrate a fresh database on a busy 2-core machine; telemetry only adds a database-lock warning.
PREFECT_DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        for key, value in PREFECT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> object:
        from pydantic import ValidationError

        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            # A flag outside its range reaches a stage's pydantic config: say so in one usage line each.
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise click.UsageError(f"invalid {exc.title} value: {problems}", ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from the table, so `occ --help` imports no stage module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="occ")
def main(verbose: int) -> None:
    """occ: the OCC-MLLM-CoT pipeline. Every stage is a sub-command; `occ demo` runs them all."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    main()
