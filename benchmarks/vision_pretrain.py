"""Shape sweep of the tiny vision tower on the GPU host: synthesise, render, pre-train, keep the best.

One command does it all, so one device lease suffices (docs: device README):

    python -m benchmarks.vision_pretrain sweep --work /tmp/vt --out $OUT --device cuda

It synthesises training roots (seeds 1000+) and held-out roots (seeds 2000+, so other meshes), renders
view 0 of every frame with the oracle backend, then pre-trains every shape of ``SWEEP`` at once (one
process each: the small towers leave the GPU mostly idle). Each member also measures the SFT1 vision
policies on occluded frames with a classification head: ``frozen`` (head only), ``last`` (last layer +
head) and ``full``, against a tower trained from scratch. The member with the best fully fine-tuned
occluded accuracy is copied to ``--out`` (tower and card, the sweep added to the card).

``python -m benchmarks.vision_pretrain cpu-cost`` prints a forward+backward of each shape at batch 16
on this machine's CPU threads. ``python -m benchmarks.vision_pretrain max-seconds`` prints how well
``--max-seconds`` keeps its bound: the training that the calibrated step count takes, as a ratio of
the budget left after calibration (below 1: inside the bound).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from occ_core.train import vision

TRAIN_SEEDS = tuple(range(1000, 1008))
HELD_OUT_SEEDS = (2000, 2001)
H256 = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4}
# name -> (InternVLVisionConfig overrides, augment, blob probability)
SWEEP: dict[str, tuple[dict, str, float]] = {
    "h256-p8-64": (H256, "mild", 0.0),
    "h256-p8-64-blobs": (H256, "mild", 0.5),
    "h256-p8-64-noaug": (H256, "none", 0.0),
    "h192-p8-64": ({}, "mild", 0.0),
    "h192-p8-64-blobs": ({}, "mild", 0.5),
    "h256-p8-96": ({**H256, "image_size": [96, 96]}, "mild", 0.0),
    "h256-p8-96-blobs": ({**H256, "image_size": [96, 96]}, "mild", 0.5),
    "h192-p4-64": ({"patch_size": [4, 4]}, "mild", 0.0),
}
POLICY_FRAMES = 1000  # occluded frames of the SFT1-like fine-tune (the demo trains on hundreds)


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _run_all(commands: list[list[str]], deadline: float, env: dict | None = None) -> list[int | None]:
    """Run commands at once; kill those still running at ``deadline`` (their code is None)."""
    procs = [subprocess.Popen(c, env=env) for c in commands]
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(None)
    return codes


def synthesise(work: Path, n_train: int, n_held_out: int, deadline: float) -> tuple[list[Path], list[Path]]:
    """Training and held-out roots (one per seed); roots whose synthesis did not finish are dropped."""
    jobs = [(work / f"train-{s}", s, n_train) for s in TRAIN_SEEDS]
    jobs += [(work / f"held-{s}", s, n_held_out) for s in HELD_OUT_SEEDS]
    commands = [
        [sys.executable, "-m", "occ_core.synth", "--out", str(root), "--n", str(n), "--seed", str(seed)]
        + ["--splits", "train", "--processes", "2"]
        for root, seed, n in jobs
    ]
    codes = _run_all(commands, deadline)
    kept = [root for (root, _, _), code in zip(jobs, codes, strict=True) if code == 0]
    _log(f"synth codes {codes}")
    return [r for r in kept if r.name.startswith("train")], [r for r in kept if r.name.startswith("held")]


def render_views(roots: list[Path], deadline: float) -> list[Path] | None:
    """View-0 oracle renders of every root (None if any render failed: renders are then left out)."""
    outs = [root.parent / f"{root.name}-views" for root in roots]
    commands = [
        [sys.executable, "-m", "occ_core.cli", "render", "--root", str(r), "--split", "train"]
        + ["--backend", "oracle", "--views", "0", "--processes", "2", "--out", str(o)]
        for r, o in zip(roots, outs, strict=True)
    ]
    codes = _run_all(commands, deadline)
    _log(f"render codes {codes}")
    return outs if all(c == 0 for c in codes) else None


def policy_accuracies(cfg: vision.VisionPretrainConfig, tower_dir: Path, steps: int) -> dict[str, float]:
    """Occluded held-out accuracy of a head fine-tuned on occluded frames, per tower policy."""
    from transformers import InternVLVisionModel

    device = torch.device(cfg.device)
    size = vision._side(cfg.vision_config()["image_size"])
    x_tr, y_tr = vision._load_set(cfg.data, cfg.split, "rgb", (), size, device)
    x_te, y_te = vision._load_set(cfg.eval_data, cfg.eval_split, "rgb", (), size, device)
    x_tr, y_tr = x_tr[:POLICY_FRAMES], y_tr[:POLICY_FRAMES]
    tune = cfg.model_copy(update={"batch_size": 64, "blob_probability": 0.0, "augment": "mild"})
    results = {}
    for policy in ("frozen", "last", "full", "scratch"):
        if policy == "scratch":
            tower = vision.build_tower(cfg.vision_config(), cfg.seed)
        else:
            tower = InternVLVisionModel.from_pretrained(tower_dir, dtype=torch.float32)
        model = vision.Classifier(tower).to(device)
        params = list(model.head.parameters())
        if policy == "last":
            params += list(model.tower.encoder.layer[-1].parameters())
        elif policy in ("full", "scratch"):
            params = list(model.parameters())
        vision.fit(model, x_tr, y_tr, tune, steps, 3e-4 if policy != "scratch" else 1e-3, params)
        results[policy] = round(vision.accuracy(model, x_te, y_te), 4)
    results["majority"] = round(vision.majority_rate(y_te.tolist()), 4)
    results["train_frames"] = len(x_tr)
    return results


@click.group()
def cli() -> None:
    """Vision-tower sweep (GPU host) and CPU cost."""


@cli.command()
@click.option("--spec", required=True, help="JSON: member name and VisionPretrainConfig fields")
def member(spec: str) -> None:
    """Pre-train one sweep member and measure its SFT1 policies (run by ``sweep``)."""
    args = json.loads(spec)
    name, work, policy_steps = args.pop("name"), Path(args.pop("work")), args.pop("policy_steps")
    overrides, augment, blobs = SWEEP[name]
    cfg = vision.VisionPretrainConfig(
        **args, vision=overrides, augment=augment, blob_probability=blobs, out=work / "runs" / name
    )
    card = vision.pretrain_vision(cfg)
    card["sft1_policy_occluded_accuracy"] = policy_accuracies(cfg, cfg.out, policy_steps)
    (cfg.out / vision.CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    _log(
        f"{name}: {card['held_out_accuracy']} probe {card['linear_probe']}"
        f" policies {card['sft1_policy_occluded_accuracy']}"
    )


@cli.command()
@click.option(
    "--work", type=click.Path(path_type=Path), required=True, help="scratch folder for data and runs"
)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="where the best tower and logs go"
)
@click.option("--n-train", type=int, default=1000, show_default=True, help="frames per training seed")
@click.option("--n-held-out", type=int, default=400, show_default=True, help="frames per held-out seed")
@click.option("--steps", type=int, default=2500, show_default=True, help="pre-training steps per member")
@click.option(
    "--policy-steps", type=int, default=400, show_default=True, help="steps of each SFT1-policy run"
)
@click.option("--budget", type=float, default=540, show_default=True, help="seconds for the whole sweep")
@click.option("--device", default="cuda", show_default=True, help="torch device")
def sweep(
    work: Path,
    out: Path,
    n_train: int,
    n_held_out: int,
    steps: int,
    policy_steps: int,
    budget: float,
    device: str,
) -> None:
    """Synthesise, render, pre-train every SWEEP member in parallel, keep the best in --out."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    train, held = synthesise(work, n_train, n_held_out, start + 0.45 * budget)
    _log(f"synth done: train roots {len(train)}, held-out roots {len(held)}, {time.time() - start:.0f} s")
    views = render_views(train + held, start + 0.55 * budget)
    _log(f"renders {'done' if views else 'FAILED'}, {time.time() - start:.0f} s")
    base = {
        "work": str(work),
        "data": [str(r) for r in train],
        "eval_data": [str(r) for r in held],
        "renders": [str(v) for v in views[: len(train)]] if views else [],
        "eval_renders": [str(v) for v in views[len(train) :]] if views else [],
        "steps": steps,
        "policy_steps": policy_steps,
        "seed": 0,
        "device": device,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    commands = [
        [
            sys.executable,
            "-m",
            "benchmarks.vision_pretrain",
            "member",
            "--spec",
            json.dumps({**base, "name": n}),
        ]
        for n in SWEEP
    ]
    codes = _run_all(commands, start + budget - 25, env)
    _log(f"members {dict(zip(SWEEP, codes, strict=True))}, {time.time() - start:.0f} s")
    cards = {}
    for name in SWEEP:
        path = work / "runs" / name / vision.CARD_NAME
        if path.is_file() and "sft1_policy_occluded_accuracy" in (card := json.loads(path.read_text())):
            cards[name] = card
    summary = {
        name: {
            "held_out_accuracy": c["held_out_accuracy"],
            "held_out_majority": c["held_out_majority"],
            "linear_probe": c["linear_probe"],
            "sft1_policy_occluded_accuracy": c["sft1_policy_occluded_accuracy"],
            "train_seconds": c["seconds"]["train"],
            "parameters": c["parameters"],
        }
        for name, c in cards.items()
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not cards:
        raise SystemExit("no member finished")
    best = max(cards, key=lambda n: cards[n]["sft1_policy_occluded_accuracy"]["full"])
    for name, card in cards.items():
        card["shapes_tried"] = summary
        card["chosen"] = best
        run_dir = work / "runs" / name
        (run_dir / vision.CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    for name in (best, "h256-p8-64-blobs" if best != "h256-p8-64-blobs" else "h256-p8-64"):
        if name in cards:
            shutil.make_archive(str(out / name), "gztar", work / "runs" / name)
    _log(f"best {best}; {time.time() - start:.0f} s")


@cli.command("cpu-cost")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads")
@click.option("--repeats", type=int, default=8, show_default=True, help="timed steps per shape")
def cpu_cost(threads: int, repeats: int) -> None:
    """Seconds of one forward+backward+AdamW step of each SWEEP shape at batch 16 on the CPU."""
    torch.set_num_threads(threads)
    for name, (overrides, _, blobs) in SWEEP.items():
        if blobs or name.endswith("noaug"):
            continue
        shape = {**vision.TINY_VISION_CONFIG, **overrides}
        model = vision.Classifier(vision.build_tower(shape, 0))
        optimiser = torch.optim.AdamW(model.parameters())
        side = vision._side(shape["image_size"])
        x, y = torch.randn(16, 3, side, side), torch.randint(0, 8, (16,))
        times = []
        for _ in range(repeats + 1):
            tick = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
            optimiser.zero_grad()
            times.append(time.perf_counter() - tick)
        times = sorted(times[1:])
        params = sum(p.numel() for p in model.tower.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {times[len(times) // 2]:.3f} s | {times[0]:.3f} s |")


@cli.command("max-seconds")
@click.option("--budget", type=float, default=20.0, show_default=True, help="--max-seconds of each run")
@click.option("--repeats", type=int, default=3, show_default=True, help="calibrated runs")
@click.option("--device", default="cpu", show_default=True, help="torch device")
def max_seconds(budget: float, repeats: int, device: str) -> None:
    """Training time of the calibrated step count / the budget left after calibration, per run."""
    dev = torch.device(device)
    shape = vision.TINY_VISION_CONFIG
    side = vision._side(shape["image_size"])
    x = torch.randn(512, 3, side, side, device=dev).half()
    y = torch.randint(0, 8, (512,), device=dev)
    cfg = vision.VisionPretrainConfig(
        data=(Path("."),), out=Path("."), steps=10**6, max_seconds=budget, batch_size=16, device=device
    )
    print("| run | steps | calibration s | training s | training / budget left |")
    for run in range(repeats):
        steps, calibration = vision.calibrate_steps(shape, x, y, cfg)
        model = vision.Classifier(vision.build_tower(shape, cfg.seed)).to(dev)
        tick = time.perf_counter()
        vision.fit(model, x, y, cfg, steps, cfg.learning_rate)
        vision._sync(dev)
        took = time.perf_counter() - tick
        spent = calibration["calibration_seconds"]
        print(f"| {run} | {steps} | {spent:.2f} | {took:.2f} | {took / (budget - spent):.2f} |")


if __name__ == "__main__":
    cli()
