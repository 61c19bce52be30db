"""Evaluation protocol speed: occ's batched Q1, clarity and render fallback against the upstream loop.

    python -m benchmarks.evaluate --out DIR [--shape tiny|internvl3-1b] [--frames 32] [--batch-size 32]
        [--baseline-frames N] [--fallback all|no] [--max-new-tokens 16] [--checkpoint C]
        [--root ROOT --views V --split test] [--device auto|cpu|cuda] [--work DIR]

Both approaches run the protocol of docs/method-spec.md section 6 (issue 10 section 7) with the same
model, on the same images, in the same process, greedy and with the same ``--max-new-tokens``:

- occ: ``occ_core.evaluate.infer.infer_shard``, as ``occ evaluate run`` calls it: one batched pass of
  Q1 over every image, one of the clarity question (second turn, Q1 and its answer as history), one of
  Q1 on the view-0 renders, ``--batch-size`` images per left-padded ``generate`` call;
- upstream: the seed's evaluation script, one image at a time, one ``chat``-like call (one prompt,
  one ``generate``) per question: Q1, then clarity with the Q1 turn as history, then Q1 on the
  render when clarity says no.

Random-weight models answer garbage, so clarity almost never parses as "no": ``--fallback all`` (the
default) asks the render question of every image in both approaches, so the third pass really runs;
the output says how many fallback calls each made. Garbage also runs to the token cap, which is why it
is reported. The baseline may take fewer images (``--baseline-frames``, the first N of the same set):
both rates are images/s over the images each processed, and the answers are compared on the images both
processed. An untimed warm-up (one batch, one image) comes first.

The model: ``internvl3-1b`` is benchmarks/train_gpu.py's random-weight InternVL3-1B shape; ``tiny`` is
the tiny preset's base (its pre-trained tower, random language model), or ``--checkpoint`` any saved
model, in fp32 as ``occ evaluate run`` loads it (no autocast; upstream ran bf16). The data: a
synthetic test split from occ's synth with its view-0 renders by the oracle backend (``occ render
--backend oracle --views 0``), or ``--root``/``--views``. ``DIR/results.json`` and ``DIR/results.md``
hold the figures.

GPU (one H200), after the install preamble of benchmarks/RESULTS.md's training-stages section
(``.whl``, ``.gl`` and ``.whl-train`` carried); the loop takes 32 of the 256 images so that the whole
run stays under about 3 minutes, and ``DIR/results.json`` is written once occ's pass is timed, so a
cut-off loop still leaves it:

    timeout 190 python3 -m benchmarks.evaluate --out $OUT/eval --work /tmp/ew --shape internvl3-1b \\
        --frames 256 --batch-size 64 --baseline-frames 32 --max-new-tokens 16
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from benchmarks.train_gpu import PRESET, build_model_dir, environment
from moho_bridge.cli import split_name
from occ_core.cot import Prompts, content_blocks
from occ_core.evaluate.infer import InferConfig, TestItem, infer_shard, items_from_root, render_path
from occ_core.evaluate.score import normalise_clarity

SPLIT = "test"
ANSWERS = ("q1", "clarity", "q1_3d")


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_test_data(work: Path, frames: int, seed: int = 13) -> tuple[Path, Path]:
    """A synthetic test split (occ's synth) and its view-0 renders by the oracle backend.

    Returns:
        The ObMan root and the views directory.
    """
    from moho_bridge.pipeline import RenderParams, render_split
    from occ_core.synth import SynthConfig, generate

    root, views = work / "obman", work / "views"
    generate(SynthConfig(out=root, n=frames, seed=seed, splits=(SPLIT,)))
    render_split(RenderParams(root=root, split=SPLIT, backend="oracle", views=0, out=views))
    return root, views


def load_policy(shape: str, checkpoint: Path | None, work: Path, device: str) -> tuple[Any, Any, dict]:
    """The model both approaches use, on ``device``, and what it is."""
    from occ_core.train.checkpoint import read_card
    from occ_core.train.model import base_model, load_model, parameter_counts, resolve_device
    from occ_core.train.presets import get_preset

    if checkpoint is not None:
        preset = (read_card(checkpoint) or {}).get("preset") or "tiny"
        policy, processor = load_model(checkpoint, get_preset(preset))
        origin = str(checkpoint)
    elif shape == "tiny":
        policy, processor, origin = base_model(get_preset("tiny"), None, seed=0)
    else:
        directory = work / "model"
        build_model_dir(directory, shape)
        policy, processor = load_model(directory, get_preset(PRESET))
        origin = f"{shape}, random weights (benchmarks.train_gpu.build_model_dir)"
    import torch

    device = resolve_device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as occ_core.evaluate.infer loads it
    policy = policy.to(device, dtype=dtype)
    return (
        policy,
        processor,
        {"origin": origin, "device": device, "dtype": str(dtype), **parameter_counts(policy)},
    )


def chat(policy: Any, processor: Any, image: Path, messages: list[dict[str, Any]], cfg: InferConfig) -> str:
    """One upstream ``model.chat`` call: one image, one conversation, one greedy ``generate``."""
    from occ_core.train.predict import generate_answers

    row = {"images": [str(image)], "messages": messages}
    return generate_answers(policy, processor, [row], 1, cfg.max_new_tokens, lambda r: r["messages"])[0]


def one_at_a_time(
    policy: Any, processor: Any, items: list[TestItem], views: Path, split: str, cfg: InferConfig
) -> list[dict[str, Any]]:
    """The seed's evaluation loop: per image Q1, clarity with the Q1 turn as history, Q1 on the render."""
    prompts = Prompts()
    q1_turn = [{"role": "user", "content": content_blocks(prompts.with_image(prompts.q1))}]
    question = {"role": "user", "content": [{"type": "text", "text": cfg.clarity_question()}]}
    rows = []
    for item in items:
        q1 = chat(policy, processor, item.image, q1_turn, cfg)
        reply = {"role": "assistant", "content": [{"type": "text", "text": q1}]}
        clarity = chat(policy, processor, item.image, [*q1_turn, reply, question], cfg)
        q1_3d = None
        if cfg.fallback == "all" or normalise_clarity(clarity) == "no":
            q1_3d = chat(policy, processor, render_path(views, item.id, split), q1_turn, cfg)
        rows.append({"id": item.id, "q1": q1, "clarity": clarity, "q1_3d": q1_3d})
    return rows


def _timed(function: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def agreement(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per answer field, how many of the images both processed got the same text; the first differences."""
    by_id = {row["id"]: row for row in ours}
    fields = {name: {"compared": 0, "equal": 0} for name in ANSWERS}
    differences = []
    for row in theirs:
        mine = by_id[row["id"]]
        for name in ANSWERS:
            fields[name]["compared"] += 1
            fields[name]["equal"] += mine[name] == row[name]
            if mine[name] != row[name] and len(differences) < 5:
                differences.append({"id": row["id"], "field": name, "occ": mine[name], "upstream": row[name]})
    compared = sum(f["compared"] for f in fields.values())
    equal = sum(f["equal"] for f in fields.values())
    return {
        "compared": compared,
        "equal": equal,
        "rate": equal / compared,
        "fields": fields,
        "first_differences": differences,
    }


def _approach(rows: list[dict[str, Any]], seconds: float, calls: int) -> dict[str, Any]:
    fallback = sum(row["q1_3d"] is not None for row in rows)
    return {
        "images": len(rows),
        "seconds": round(seconds, 3),
        "images_per_s": len(rows) / seconds,
        "generate_calls": calls,
        "fallback_answers": fallback,
    }


def _batched_calls(rows: list[dict[str, Any]], batch: int) -> int:
    def batches(n: int) -> int:
        return -(-n // batch)

    asked = sum(row["q1"] is not None for row in rows)
    return 2 * batches(asked) + batches(sum(row["q1_3d"] is not None for row in rows))


def markdown(report: dict[str, Any]) -> str:
    """The two approaches side by side, the ratio and the agreement."""
    ours, theirs, agree = report["occ"], report["upstream"], report["agreement"]
    lines = [
        "| approach | images | seconds | images/s | generate calls | fallback answers |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("occ batched", ours), ("upstream one at a time", theirs)):
        lines.append(
            f"| {name} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.2f} | "
            f"{r['generate_calls']} | {r['fallback_answers']} |"
        )
    fields = ", ".join(f"{k} {v['equal']}/{v['compared']}" for k, v in agree["fields"].items())
    lines += [
        "",
        f"ratio (images/s, occ / upstream): {report['ratio']:.2f}x; batch {report['batch_size']}, "
        f"max_new_tokens {report['max_new_tokens']}, fallback {report['fallback']}, "
        f"model {report['model']['origin']} on {report['model']['device']}",
        f"same answers: {agree['equal']}/{agree['compared']} ({agree['rate']:.1%}; {fields})",
    ]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="results folder")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None, help="model, data")
@click.option("--shape", type=click.Choice(["tiny", "internvl3-1b"]), default="tiny", show_default=True)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="a saved model instead of --shape's",
)
@click.option(
    "--frames",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="synthetic frames (--root: the first N)",
)
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--views", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--split", default=SPLIT, show_default=True, callback=split_name, help="split of --root")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--baseline-frames",
    type=click.IntRange(min=1),
    default=None,
    help="images of the one-at-a-time loop, the first of the same set (default: all)",
)
@click.option("--fallback", type=click.Choice(["all", "no"]), default="all", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def main(
    out: Path,
    work: Path | None,
    shape: str,
    checkpoint: Path | None,
    frames: int,
    root: Path | None,
    views: Path | None,
    split: str,
    batch_size: int,
    baseline_frames: int | None,
    fallback: str,
    max_new_tokens: int,
    device: str,
) -> None:
    """Time the evaluation protocol batched (occ) and one image at a time (upstream); write the ratio."""
    if (root is None) != (views is None):
        raise click.UsageError("give --root and --views together, or neither (synthetic data)")
    out.mkdir(parents=True, exist_ok=True)
    work = (work or out / "work").resolve()
    os.environ.setdefault("OCC_HOME", str(work / "home"))  # before occ reads its settings
    if root is None:
        _log(f"synthesising {frames} test frames and their oracle view-0 renders")
        root, views = build_test_data(work, frames)
        split = SPLIT
    items, excluded = items_from_root(root, split)
    items = items[:frames]
    if not items:
        raise click.BadParameter(f"no frame with an answer under {root} split {split}", param_hint="--root")
    cfg = InferConfig(fallback=fallback, batch_size=batch_size, max_new_tokens=max_new_tokens)
    _log(f"loading the model ({checkpoint or shape})")
    policy, processor, model = load_policy(shape, checkpoint, work, device)
    _log(f"model: {model}; {len(items)} images ({len(excluded)} without an answer left out)")

    warm = items[: min(batch_size, len(items))]
    infer_shard(policy, processor, warm, views, split, cfg)
    one_at_a_time(policy, processor, warm[:1], views, split, cfg)
    _log("warm-up done; occ batched")
    ours, ours_s = _timed(infer_shard, policy, processor, items, views, split, cfg)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "env": environment(),
        "model": model,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "fallback": fallback,
        "clarity_prompt": cfg.clarity_prompt,
        "occ": _approach(ours, ours_s, _batched_calls(ours, batch_size)),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")  # kept if the loop is cut off
    baseline = items[: baseline_frames or len(items)]
    _log(f"occ: {len(items) / ours_s:.2f} images/s; upstream one at a time on {len(baseline)} images")
    theirs, theirs_s = _timed(one_at_a_time, policy, processor, baseline, views, split, cfg)
    upstream_calls = sum(2 + (row["q1_3d"] is not None) for row in theirs)
    report["upstream"] = _approach(theirs, theirs_s, upstream_calls)
    report["agreement"] = agreement(ours, theirs)
    report["examples"] = theirs[:3]
    report["ratio"] = report["occ"]["images_per_s"] / report["upstream"]["images_per_s"]
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    print(markdown(report), flush=True)


if __name__ == "__main__":
    main()
