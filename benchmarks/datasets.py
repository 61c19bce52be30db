"""Dataset builders' throughput: rows per second of each occ builder against the upstream way, same run.

    python -m benchmarks.datasets [--rows 150000 --repeats 3]

Input: synthetic Q1 rows (``{id, image, conversations}``, sparse 8-digit ids, classes drawn with the
10K train set's priors) and an upstream-format wrong-id list holding 28.85% of the ids, as the method's.

The peer is the upstream approach written plainly: read the whole file with ``json.loads`` per line
into dicts, build each output row in a Python loop, ``random.sample``/``random.shuffle`` for
balancing, ``json.dumps`` per row. Ours is occ_core.cot / occ_core.preference: a typed sample table,
one serialised conversation per (turns, class, label) joined to each row's id and image, seeded
numpy draws. Both read the same file and write JSONL to the same folder; for the deterministic
builders (sft1, sft2, sc) the benchmark checks the two outputs are the same bytes. "parquet export"
is the trl table of the SFT2 rows: ours takes shared templates, the peer builds every message dict
and calls ``pa.Table.from_pylist``. Times are the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from occ_core import cot, preference
from occ_core.classes import QA_CLASSES, class_priors
from occ_core.cot import CotConfig, Prompts
from occ_core.fsio import write_parquet_atomic
from occ_core.jsonl import write_lines_atomic
from occ_core.occlusion import METHOD_UNCLEAR_RATE
from occ_core.preference import BalanceConfig

Q1, Q6, Q0 = (
    "What's the object in the hand?\n<image>",
    Prompts().q6,
    "Please analyze this image step by step.\n<image>",
)


def make_inputs(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Synthetic Q1 rows and a wrong-id list in the upstream formats."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:08d}" for i in np.sort(rng.choice(rows * 3 // 2, rows, replace=False))]
    priors = class_priors()
    classes = rng.choice(list(priors), rows, p=list(priors.values()))
    with open(folder / "q1.jsonl", "w", encoding="utf-8") as fh:
        for sample_id, cls in zip(ids, classes, strict=True):
            fh.write(
                json.dumps(
                    {
                        "id": sample_id,
                        "image": f"{sample_id}.jpg",
                        "conversations": [
                            {"from": "human", "value": Q1},
                            {"from": "gpt", "value": f"The object is {cls}."},
                        ],
                    }
                )
                + "\n"
            )
    wrong = rng.choice(ids, round(METHOD_UNCLEAR_RATE * rows), replace=False)
    (folder / "wrong.json").write_text(json.dumps([{"answer": i} for i in wrong]))
    return folder / "q1.jsonl", folder / "wrong.json"


# --- the peer: the upstream approach, plainly -------------------------------------------------------


def peer_read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def peer_write(path: Path, rows: list[dict]) -> int:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def peer_sft2_rows(source: Path, wrong_path: Path) -> list[dict]:
    wrong = {item["answer"] for item in json.loads(wrong_path.read_text())}
    return [
        {
            "id": r["id"],
            "image": r["image"],
            "conversations": r["conversations"][:2]
            + [
                {"from": "human", "value": Q6},
                {"from": "gpt", "value": "No." if r["id"] in wrong else "Yes."},
            ],
        }
        for r in peer_read(source)
    ]


def peer_sft1(source: Path, wrong: Path, out: Path) -> int:
    return peer_write(
        out,
        [
            {"id": r["id"], "image": r["image"], "conversations": r["conversations"][:2]}
            for r in peer_read(source)
        ],
    )


def peer_sft2(source: Path, wrong: Path, out: Path) -> int:
    return peer_write(out, peer_sft2_rows(source, wrong))


def peer_cot(source: Path, wrong: Path, out: Path) -> int:
    random.seed(0)
    rows = peer_sft2_rows(source, wrong)
    for row in rows:
        if random.random() < 0.25:
            row["conversations"] = [{"from": "human", "value": Q0}, {"from": "gpt", "value": cot.COT_ANSWER}]
    return peer_write(out, rows)


def peer_sc(source: Path, wrong: Path, out: Path) -> int:
    return peer_write(
        out,
        [
            {"id": r["id"], "image": r["image"], "conversations": r["conversations"][:2]}
            for r in peer_read(source)[:101]
        ],
    )


def peer_pairs(sft2: Path, wrong: Path, out: Path) -> int:
    random.seed(0)
    positive, negative = [], []
    for row in peer_read(sft2):
        (negative if row["conversations"][3]["value"] == "No." else positive).append(row)
    n = min(len(positive), len(negative))
    balanced = random.sample(positive, n) + random.sample(negative, n)
    random.shuffle(balanced)
    pairs = []
    for row in balanced:
        answer = row["conversations"][3]["value"]
        pairs.append(
            {
                "image": row["image"],
                "question": row["conversations"][2]["value"] + "\n",
                "chosen": answer,
                "rejected": "No." if answer == "Yes." else "Yes.",
            }
        )
    return peer_write(out, pairs)


def peer_parquet(sft2: Path, wrong: Path, out: Path) -> int:
    records = []
    for row in peer_read(sft2):
        turns = [
            {
                "role": "user" if t["from"] == "human" else "assistant",
                "content": t["value"].replace("<image>", "").strip(),
            }
            for t in row["conversations"]
        ]
        records.append(
            {"id": row["id"], "images": [row["image"]], "prompt": turns[:-1], "completion": turns[-1:]}
        )
    pq.write_table(pa.Table.from_pylist(records), out, compression="zstd")
    return len(records)


# --- ours -------------------------------------------------------------------------------------------


def ours_builder(stage: str) -> Callable[[Path, Path, Path], int]:
    def build(source: Path, wrong: Path, out: Path) -> int:
        cfg = CotConfig(limit=101 if stage == "sc" else None)
        table, _ = cot.read_rows(source, cfg.prompts)
        if stage in ("sft2", "cot"):
            table = cot.label_unclear(table, cot.read_unclear_ids(wrong))
        rows = cot.build_rows(table, stage, cfg)
        cot.check_rows(rows)
        return write_lines_atomic(out, cot.encode_rows(rows, cfg.prompts))

    return build


def ours_pairs(sft2: Path, wrong: Path, out: Path) -> int:
    table, report = cot.read_rows(sft2)
    balanced = preference.balance_labels(cot.drop_unlabelled(table, report, sft2), BalanceConfig())
    cot.check_rows(balanced)
    return write_lines_atomic(out, preference.encode_pairs(balanced, Prompts()))


def ours_parquet(sft2: Path, wrong: Path, out: Path) -> int:
    table, _ = cot.read_rows(sft2)
    rows = cot.build_rows(table, "sft2")
    write_parquet_atomic(out, cot.trl_table(rows, Prompts(), None))
    return len(rows)


def best_time(
    fn: Callable[[Path, Path, Path], int], args: tuple[Path, Path, Path], repeats: int
) -> tuple[float, int]:
    times, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=150_000, help="synthetic Q1 rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="occ-bench-datasets-") as tmp:
        folder = Path(tmp)
        source, wrong = make_inputs(folder, args.rows)
        # pairs and parquet start from SFT2 rows, as upstream's did.
        sft2 = folder / "sft2_input.jsonl"
        ours_builder("sft2")(source, wrong, sft2)
        cases = [
            (stage, ours_builder(stage), peer, source)
            for stage, peer in [("sft1", peer_sft1), ("sft2", peer_sft2), ("cot", peer_cot), ("sc", peer_sc)]
        ]
        cases += [
            ("pairs (balanced)", ours_pairs, peer_pairs, sft2),
            ("parquet export", ours_parquet, peer_parquet, sft2),
        ]
        print(
            f"{args.rows} Q1 rows, {len(QA_CLASSES)} classes; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; best of {args.repeats}"
        )
        print(
            f"{'builder':<18}{'rows out':>10}{'ours rows/s':>14}{'peer rows/s':>14}{'ratio':>8}  same bytes"
        )
        for name, ours, peer, input_path in cases:
            suffix = ".parquet" if name == "parquet export" else ".jsonl"
            ours_out, peer_out = folder / f"ours{suffix}", folder / f"peer{suffix}"
            ours_seconds, count = best_time(ours, (input_path, wrong, ours_out), args.repeats)
            peer_seconds, _ = best_time(peer, (input_path, wrong, peer_out), args.repeats)
            rows_in = args.rows
            same = (
                "yes"
                if ours_out.read_bytes() == peer_out.read_bytes()
                else ("n/a" if name in ("cot", "pairs (balanced)", "parquet export") else "NO")
            )
            print(
                f"{name:<18}{count:>10}{rows_in / ours_seconds:>14,.0f}{rows_in / peer_seconds:>14,.0f}"
                f"{peer_seconds / ours_seconds:>7.2f}x  {same}"
            )
        print("rows/s counts input rows read; 'n/a': seeded draws differ from the peer's by design")


if __name__ == "__main__":
    main()
