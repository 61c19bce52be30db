"""What any self-correction objective can gain on a checkpoint: the second look against the first, same rows.

    python -m benchmarks.sc_bound --init CKPT --data DATASETS_DIR [--data ...] --test TEST_DATASETS_DIR
        [--reask conversation|rewrite] [--epochs 3] [--learning-rate 3e-4] [--batch-size 16] [--seed 0]
        [--preset tiny] [--device cpu] [--out DIR]

Two arms fine-tune a copy of CKPT on the same Q1 rows (``sft1.jsonl`` of every ``--data``), in the same
order, with the same optimiser, schedule and seed, and are scored greedily on the ``--test`` rows after
every epoch:

- **second look**: attempt 1 is CKPT's own greedy answer, pinned (it is never trained, so it cannot
  drift); attempt 2 answers the re-ask (attempt 1 in the conversation, or the rewritten question alone)
  and learns the truth by cross-entropy. That is the most a self-correction objective can get out of these
  rows: the truth's likelihood bounds what a policy gradient on an exact-match reward learns from the same
  rows, and holding attempt 1 exactly where it was is the strongest anchor there is.
- **first look** (the peer): the plain Q1 prompt learns the truth on the same rows, i.e. attempt 1 given
  the data attempt 2 got.

The ratio is second look / first look. A second look that beats its pinned attempt 1 but not the first
look trained on the same rows gains from the data, not from seeing attempt 1: a gap SC could only show
by training attempt 2 on rows attempt 1 is kept from. Paired counts on the test frames: ``fixed`` /
``broken`` against the pinned attempt 1 (what ``occ train --stage sc --test`` reports), and the frames
only the second look or only the first look gets right, each with its exact sign test (``p``).

``DIR/results.json`` holds every epoch's figures and the environment. The measured rows are in
benchmarks/RESULTS.md ("self-correction: the bound").
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from benchmarks.train_gpu import environment
from occ_core.train.data import load_sft
from occ_core.train.model import apply_vision_policy, load_model
from occ_core.train.predict import first_question, generate_answers, reference_answers
from occ_core.train.presets import PRESETS, get_preset
from occ_core.train.sc import (
    answer_nll,
    end_of_turn_ids,
    only_right,
    reask_messages,
    reference_attempt,
    sign_test_p,
)

# A row and attempt 1's answer to it -> the messages the trained answer follows.
PromptOf = Callable[[dict[str, Any], str], list[dict[str, Any]]]


def fine_tune_epochs(
    init: Any,
    processor: Any,
    rows: list[dict[str, Any]],
    first_answers: list[str],
    prompt_of: PromptOf,
    settings: dict[str, Any],
) -> Iterator[tuple[float, Any]]:
    """Fine-tune a copy of ``init`` on the truth after ``prompt_of(row, attempt 1)``; after each epoch,
    yield its mean training loss and the model (in eval mode).

    The tower follows the preset's policy; AdamW with 3% linear warm-up and a cosine decay over the run;
    the row order of each epoch comes from ``settings["seed"]`` alone, so both arms see the same batches.
    """
    import torch
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(settings["seed"])
    model = copy.deepcopy(init)
    apply_vision_policy(model, settings["vision"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings["learning_rate"], weight_decay=0.0)
    batch, epochs = settings["batch_size"], settings["epochs"]
    steps = epochs * -(-len(rows) // batch)
    schedule = get_cosine_schedule_with_warmup(optimiser, int(0.03 * steps), steps)
    truth, eos = reference_answers(rows), end_of_turn_ids(model)[0]
    device = next(model.parameters()).device
    for epoch in range(1, epochs + 1):
        order = list(range(len(rows)))
        random.Random(settings["seed"] * 1000 + epoch).shuffle(order)
        model.train()
        losses = []
        for start in range(0, len(order), batch):
            picked = order[start : start + batch]
            prompts = [{**rows[i], "messages": prompt_of(rows[i], first_answers[i])} for i in picked]
            loss = answer_nll(
                model, reference_attempt(processor, prompts, [truth[i] for i in picked], eos, device)
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        yield sum(losses) / len(losses), model


def bound(
    init_dir: Path,
    data_dirs: list[Path],
    test_dir: Path,
    reask: str,
    settings: dict[str, Any],
    device: str = "cpu",
) -> dict[str, Any]:
    """Both arms from ``init_dir`` on the rows of ``data_dirs``, scored on ``test_dir`` after every epoch."""
    preset = get_preset(settings["preset"])
    init, processor = load_model(init_dir, preset)
    init.to(device).eval()
    rows = [row for d in data_dirs for row in load_sft(d, "sft1").rows]
    test = load_sft(test_dir, "sft1").rows
    truth, test_truth = reference_answers(rows), reference_answers(test)
    first_train = generate_answers(init, processor, rows, 64)
    right_on_rows = sum(a == t for a, t in zip(first_train, truth, strict=True))
    pinned = generate_answers(init, processor, test, 64)
    pinned_right = [a == t for a, t in zip(pinned, test_truth, strict=True)]
    n = len(test)

    def second_prompt(row: dict[str, Any], answer: str) -> list[dict[str, Any]]:
        return reask_messages(row, answer, reask)

    def plain_prompt(row: dict[str, Any], answer: str) -> list[dict[str, Any]]:
        return first_question(row)

    def arm(prompt_of: PromptOf) -> list[tuple[float, list[bool]]]:
        """Each epoch's training loss and which test frames the arm then gets right."""
        prompts = [{**row, "messages": prompt_of(row, a)} for row, a in zip(test, pinned, strict=True)]
        epochs = []
        for loss, model in fine_tune_epochs(init, processor, rows, first_train, prompt_of, settings):
            out = generate_answers(model, processor, prompts, 64, prompt=lambda row: row["messages"])
            epochs.append((loss, [a == t for a, t in zip(out, test_truth, strict=True)]))
        return epochs

    def figures(loss: float, right: list[bool]) -> dict[str, Any]:
        fixed, broken = only_right(right, pinned_right)
        return {
            "train_loss": round(loss, 4),
            "accuracy": round(sum(right) / n, 4),
            "fixed": fixed,
            "broken": broken,
            "p_value": round(sign_test_p(fixed, broken), 4),
        }

    started = time.perf_counter()
    second, first = arm(second_prompt), arm(plain_prompt)
    epochs = []
    for epoch, ((s_loss, s_right), (f_loss, f_right)) in enumerate(zip(second, first, strict=True), 1):
        s, f = figures(s_loss, s_right), figures(f_loss, f_right)
        only_second, only_first = only_right(s_right, f_right)
        epochs.append(
            {
                "epoch": epoch,
                "second_look": s,
                "first_look": f,
                "ratio": round(s["accuracy"] / f["accuracy"], 3) if f["accuracy"] else None,
                "only_second_right": only_second,
                "only_first_right": only_first,
                "p_value_vs_first": round(sign_test_p(only_second, only_first), 4),
            }
        )
    return {
        "init": str(init_dir),
        "data": [str(d) for d in data_dirs],
        "test": str(test_dir),
        "reask": reask,
        "settings": settings,
        "rows": len(rows),
        "init_attempt1_on_rows": round(right_on_rows / len(rows), 4),
        "test_frames": n,
        "pinned_attempt1": round(sum(pinned_right) / n, 4),
        "epochs": epochs,
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment(),
    }


def lines(report: dict[str, Any]) -> list[str]:
    """The report as a table, one line an epoch."""
    head = (
        f"{report['rows']} rows (init attempt 1 right on {report['init_attempt1_on_rows']:.3f} of them), "
        f"{report['test_frames']} test frames, re-ask {report['reask']}; pinned attempt 1 "
        f"{report['pinned_attempt1']:.3f}"
    )
    table = ["epoch  first look  second look  ratio  fixed/broken vs pinned (p)  only 2nd/only 1st right (p)"]
    for e in report["epochs"]:
        s, f = e["second_look"], e["first_look"]
        ratio = f"{e['ratio']}x" if e["ratio"] is not None else "n/a"
        table.append(
            f"{e['epoch']:>5}  {f['accuracy']:>10.3f}  {s['accuracy']:>11.3f}  {ratio:>6}  "
            f"{s['fixed']:>7} / {s['broken']:<3} ({s['p_value']:.3f})     "
            f"{e['only_second_right']:>7} / {e['only_first_right']:<3} ({e['p_value_vs_first']:.3f})"
        )
    return [head, *table]


@click.command()
@click.option(
    "--init",
    "init_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="checkpoint both arms start from (the demo's: OCC_HOME/train/mpo-*)",
)
@click.option(
    "--data",
    "data_dirs",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    required=True,
    help="datasets-stage directory whose sft1 rows train both arms",
)
@click.option(
    "--test",
    "test_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="datasets-stage directory of the held-out split",
)
@click.option(
    "--reask",
    type=click.Choice(["conversation", "rewrite"]),
    default="conversation",
    show_default=True,
    help="attempt 2's prompt, as occ train --stage sc --sc-reask",
)
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--learning-rate", type=float, default=3e-4, show_default=True, help="peak, cosine after warm-up"
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="row order and initial RNG of both arms")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder for results.json (default: print only)",
)
def main(init_dir, data_dirs, test_dir, reask, epochs, learning_rate, batch_size, seed, preset, device, out):
    """Second look (attempt 1 pinned, attempt 2 trained on the truth) against first look, same rows."""
    settings = {
        "epochs": epochs,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "seed": seed,
        "preset": preset,
        "vision": get_preset(preset).vision,
    }
    report = bound(init_dir, list(data_dirs), test_dir, reask, settings, device)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo("\n".join(lines(report)))


if __name__ == "__main__":
    main()
