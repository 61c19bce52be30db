"""occ's training stages SFT1 -> SFT2 -> MPO -> SC through ``occ train``, timed per stage (issue 8 section 4).

    python -m benchmarks.train_gpu --out DIR [--steps 200] [--mpo-steps N] [--sc-steps 100]
        [--sc-batch-size 4] [--shape internvl3-1b|tiny] [--work DIR]

Builds an InternVL model directory from a config (random weights; ``internvl3-1b``: InternViT-300M at
448 px, patch 14, pixel shuffle 0.5, Qwen2.5-0.5B text with an untied head and vocab 151,674, 938 M
parameters; ``tiny``: the tiny preset's shape) with occ's tiny tokenizer (a BPE over the QA sentences,
InternVL's special tokens, ChatML), makes a synthetic split with occ's synth and datasets stages, and
runs the four stages as ``python -m occ_core.cli train --preset internvl-1b`` subprocesses, each
starting from the previous one's output (SC, issue 9, from MPO's). The processor resizes the 256 px
frames to the tower's side.

Per stage it reports the steps, the median step time (from the wall times of the stage's TensorBoard
loss events, logged every step; the first ``WARMUP`` steps dropped), samples/s (pairs/s for mpo) at
that median, and from the stage's model card the trainer's runtime and samples/s (those include the
final checkpoint), the peak GPU memory, the trainable parameters and the first/last loss. For SC a
sample is a prompt (Q1 row; ``--sc-batch-size`` a step): each step samples ``sc_samples`` (occ's
default 8) first answers per prompt and a second attempt of each, then scores both with the policy and
the frozen init; SC's rows add the mean over its logged steps of its rewards and exact-match accuracies
of attempt 1 and 2 (from ``metrics.jsonl``).
``DIR/results.json`` and ``DIR/results.md`` are rewritten after every stage, so a run stopped by
``--time-limit`` or a failing stage still leaves the stages before it. Models, data and checkpoints go
under ``--work`` (default ``DIR/work``); each stage's checkpoints are removed once it is done.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from occ_core.train.checkpoint import CARD, CHECKPOINTS
from occ_core.train.tiny import TEXT_CONFIG, build_processor, build_tokenizer, internvl_config
from occ_core.train.vision import TINY_VISION_CONFIG

PRESET = "internvl-1b"
VOCAB = 151_674  # InternVL3-1B's; kept although the tokenizer is small, so embedding and head cost the same
TOKENIZER_VOCAB = 2_000
WARMUP = 5  # steps left out of the median: CUDA start, allocator growth, first batches
# name -> (InternVLVisionConfig kwargs, Qwen2Config kwargs, vocab size or None for the tokenizer's)
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any], int | None]] = {
    "internvl3-1b": (
        {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "image_size": [448, 448],
            "patch_size": [14, 14],
            "attention_bias": True,
            "use_qk_norm": False,
            "norm_type": "layer_norm",
        },
        {
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "intermediate_size": 4864,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
        },
        VOCAB,
    ),
    "tiny": (TINY_VISION_CONFIG, {**TEXT_CONFIG, "tie_word_embeddings": False}, None),
}
STAGES = (("sft1", None), ("sft2", "sft1"), ("mpo", "sft2"), ("sc", "mpo"))
# SC's logged metrics averaged into its row (occ_core.train.sc.SCTrainer.compute_loss logs them)
SC_MEANS = ("reward_attempt1", "reward_attempt2", "accuracy_attempt1", "accuracy_attempt2")
VERSIONS = ("torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "huggingface_hub")


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_model_dir(directory: Path, shape: str, seed: int = 0) -> dict[str, int]:
    """Write a random-weight InternVL of ``shape`` (bf16, as InternVL releases) with its processor.

    Returns:
        Total and vision-tower parameter counts.
    """
    import torch
    from transformers import InternVLForConditionalGeneration, InternVLVisionConfig

    vision_kwargs, text_kwargs, vocab = SHAPES[shape]
    tokenizer = build_tokenizer(vocab_size=TOKENIZER_VOCAB)
    vision = InternVLVisionConfig(**vision_kwargs)
    config = internvl_config(
        tokenizer,
        vision,
        {**text_kwargs, **({"vocab_size": vocab} if vocab else {})},
        tie_word_embeddings=False,  # transformers 5 reads the top-level flag; InternVL3-1B's head is untied
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is slow on CPU
        model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    counts = {
        "total": sum(p.numel() for p in model.parameters()),
        "vision": sum(p.numel() for p in model.model.vision_tower.parameters()),
    }
    model.to(torch.bfloat16).save_pretrained(directory)
    build_processor(tokenizer, vision).save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counts


def build_data(work: Path, frames: int, seed: int) -> Path:
    """A datasets-stage directory of a synthetic train split made by occ's synth and datasets stages."""
    from occ_core.config import Settings
    from occ_core.datasets import DatasetsConfig, run
    from occ_core.synth import SynthConfig, generate

    root = work / "obman"
    generate(SynthConfig(out=root, n=frames, seed=seed, splits=("train",)), processes=1)
    summary = run(DatasetsConfig(root=root, split="train"), Settings(home=work / "home"))
    return Path(summary["out_dir"])


def stage_command(stage: str, data: Path, out: Path, init: Path | None, steps: int, batch: int) -> list[str]:
    """The ``occ train`` command line of one stage: the preset's settings but batch, steps and logging."""
    command = [sys.executable, "-m", "occ_core.cli", "train", "--stage", stage, "--preset", PRESET]
    command += ["--data", str(data), "--out", str(out), "--max-steps", str(steps)]
    command += ["--batch-size", str(batch), "--grad-accum", "1", "--logging-steps", "1"]
    command += ["--save-steps", str(steps * 10)]  # no checkpoint but the trainer's final one
    return command + (["--init", str(init)] if init else [])


def step_seconds(tensorboard_dir: Path) -> list[float]:
    """Seconds between consecutive per-step loss events of a stage (each step logs once, after a sync)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    times = [e.wall_time for e in events.Scalars("train/loss")]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def logged_means(out: Path, keys: tuple[str, ...]) -> dict[str, float | None]:
    """The mean over a finished stage's logged steps (``OUT/metrics.jsonl``) of each of ``keys``."""
    from occ_core.train.metrics import read_records

    records = read_records(out)
    means: dict[str, float | None] = {}
    for key in keys:
        values = [r[key] for r in records if key in r]
        means[key] = statistics.fmean(values) if values else None
    return means


def stage_result(stage: str, out: Path, batch: int, wall: float) -> dict[str, Any]:
    """One stage's figures from its card, TensorBoard events and (SC) logged metrics."""
    card = json.loads((out / CARD).read_text())
    steps = step_seconds(out / "tensorboard")
    timed = steps[WARMUP:] or steps
    median = statistics.median(timed) if timed else None
    peak = card.get("peak_memory_gib") or {}
    return {
        "stage": stage,
        "steps": card["final_step"],
        "batch": batch,
        "median_step_s": median,
        "samples_per_s": batch / median if median else None,
        "trainer_runtime_s": card.get("train_runtime"),
        "trainer_samples_per_s": card.get("train_samples_per_second"),
        "stage_wall_s": round(wall, 1),
        "peak_allocated_gib": peak.get("allocated"),
        "peak_reserved_gib": peak.get("reserved"),
        "trainable": card["parameters"]["trainable"],
        "total": card["parameters"]["total"],
        "first_loss": card["metrics"]["first_loss"],
        "last_loss": card["metrics"]["last_loss"],
        "device": card["device"],
        **{f"mean_{key}": value for key, value in logged_means(out, SC_MEANS).items() if stage == "sc"},
    }


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The per-stage table (samples/s are pairs/s for mpo, prompts/s for sc; rewards: sc's means)."""
    head = (
        "| stage | steps | batch | median step s | samples/s (median) | trainer samples/s | "
        "trainer runtime s | stage wall s | peak alloc GiB | peak reserved GiB | trainable | "
        "first loss | last loss | reward 1 | reward 2 | accuracy 1 | accuracy 2 |"
    )
    columns = head.count(" | ") + 1
    lines = [head, "|" + "---|" * columns]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['error']} |" + " |" * (columns - 2))
            continue
        cells = [
            r["stage"],
            _cell(r["steps"]),
            _cell(r["batch"]),
            _cell(r["median_step_s"]),
            _cell(r["samples_per_s"], 1),
            _cell(r["trainer_samples_per_s"], 1),
            _cell(r["trainer_runtime_s"], 1),
            _cell(r["stage_wall_s"], 1),
            _cell(r["peak_allocated_gib"], 1),
            _cell(r["peak_reserved_gib"], 1),
            _cell(r["trainable"]),
            _cell(r["first_loss"]),
            _cell(r["last_loss"]),
            *(_cell(r.get(f"mean_{key}")) for key in SC_MEANS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    """Python, package versions and the GPU, for the results."""
    import torch

    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "gpu": gpu, "cpus": os.cpu_count(), **versions}


def _write(out: Path, report: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report["stages"]))


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="results folder")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None, help="models, data")
@click.option("--shape", type=click.Choice(list(SHAPES)), default="internvl3-1b", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="SFT steps")
@click.option("--mpo-steps", type=click.IntRange(min=1), default=None, help="MPO steps (default: --steps)")
@click.option("--sc-steps", type=click.IntRange(min=1), default=100, show_default=True, help="SC steps")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="per step")
@click.option(
    "--sc-batch-size",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="SC prompts per step (the real presets' 4; each sampled sc_samples times)",
)
@click.option("--frames", type=click.IntRange(min=8), default=64, show_default=True, help="synthetic frames")
@click.option("--time-limit", type=float, default=None, help="seconds for the whole run; later stages stop")
def main(
    out: Path,
    work: Path | None,
    shape: str,
    steps: int,
    mpo_steps: int | None,
    sc_steps: int,
    batch_size: int,
    sc_batch_size: int,
    frames: int,
    time_limit: float | None,
) -> None:
    """Run SFT1, SFT2, MPO and SC through ``occ train`` and write the per-stage table."""
    deadline = time.monotonic() + time_limit if time_limit else None
    out.mkdir(parents=True, exist_ok=True)
    work = (work or out / "work").resolve()
    shutil.rmtree(work, ignore_errors=True)
    models = work / "models"
    _log(f"building {shape} model")
    counts = build_model_dir(models / PRESET, shape)
    _log(f"model: {counts['total']:,} parameters ({counts['vision']:,} vision); synthesising {frames} frames")
    data = build_data(work, frames, seed=11)
    report: dict[str, Any] = {"shape": shape, "parameters": counts, "env": environment(), "stages": []}
    report["command"] = " ".join(sys.argv)
    env = {**os.environ, "OCC_MODELS": str(models), "OCC_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    previous: Path | None = None
    for stage, init_stage in STAGES:
        stage_out = work / stage
        n = {"mpo": mpo_steps or steps, "sc": sc_steps}.get(stage, steps)
        batch = sc_batch_size if stage == "sc" else batch_size
        command = stage_command(stage, data, stage_out, previous if init_stage else None, n, batch)
        remaining = None if deadline is None else deadline - time.monotonic()
        _log(f"{stage}: {' '.join(command[1:])}")
        started = time.monotonic()
        with open(out / f"{stage}.log", "w") as log:
            try:
                code = subprocess.run(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=remaining
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        if code != 0:
            error = "time limit" if code is None else f"exit {code}"
            report["stages"].append({"stage": stage, "error": error})
            _write(out, report)
            _log(f"{stage} failed ({error}); see {out / (stage + '.log')}")
            break
        report["stages"].append(stage_result(stage, stage_out, batch, time.monotonic() - started))
        shutil.rmtree(stage_out / CHECKPOINTS, ignore_errors=True)  # the next stage reads the final model
        _write(out, report)
        _log(f"{stage} done: " + json.dumps(report["stages"][-1]))
        previous = stage_out
    print(markdown(report["stages"]), flush=True)


if __name__ == "__main__":
    main()
