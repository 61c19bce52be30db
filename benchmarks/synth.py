"""Synthetic ObMan throughput: kept frames per second of ``occ_core.synth.generate`` by process count.

    python -m benchmarks.synth [--n 40 --processes 1,2 --seed 0]

The peer is the same generator in one process (one GL context, no pool), measured in the same run on
the same frames (same seed and split, so both write identical bytes). Each setting writes into a fresh
temporary directory and is timed end to end, pool start-up (spawned workers importing pyrender) and
mesh building included, since a real run pays for both. Frames under the visibility threshold are
rendered and dropped as in a real run; the attempts column counts them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from occ_core.config import get_settings
from occ_core.synth import SynthConfig, generate


def measure(n: int, seed: int, processes: int) -> tuple[float, int]:
    """Seconds to generate ``n`` kept frames of one split, and the attempts it took."""
    with tempfile.TemporaryDirectory(prefix="occ-bench-synth-") as tmp:
        start = time.perf_counter()
        report = generate(SynthConfig(out=Path(tmp), n=n, seed=seed, splits=("train",)), processes=processes)
        seconds = time.perf_counter() - start
    return seconds, report.extra["splits"]["train"]["attempts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="kept frames per setting")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts; 1 is the peer")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (same for every setting)")
    args = parser.parse_args()
    counts = sorted({1, *(int(p) for p in args.processes.split(","))})
    os.environ.setdefault("PYOPENGL_PLATFORM", get_settings().gl_platform)
    print(f"cpus={os.cpu_count()} gl={os.environ['PYOPENGL_PLATFORM']} n={args.n} seed={args.seed}")
    print(f"{'processes':>9} {'seconds':>8} {'attempts':>8} {'frames/s':>9} {'vs 1 process':>12}")
    peer = None
    for processes in counts:
        seconds, attempts = measure(args.n, args.seed, processes)
        rate = args.n / seconds
        peer = peer or rate
        print(f"{processes:>9} {seconds:>8.2f} {attempts:>8} {rate:>9.2f} {rate / peer:>11.2f}x")


if __name__ == "__main__":
    main()
