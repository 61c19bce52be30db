"""Benchmark: ``occ ingest`` against ``aws s3 sync`` on the same local moto server and the same objects.

    python -m benchmarks.ingest [--n 2000] [--size 3000] [--repeats 3]
    make bench

Both tools run as whole commands (a subprocess each, wall clock including interpreter start, best
of --repeats): a cold sync into an empty directory, then a no-op re-sync of the complete mirror.
Runs of the two tools alternate, so both see the same machine load. Printed: one table, the ratios
aws/occ against the aims (>= 2x cold, >= 3x no-op), and the server's CPU seconds in each best run,
which show how much of a run the server alone accounts for: on a 2-core machine moto needs 2.6-3.7
ms of CPU per small GET and 0.15-0.25 s per 1,000 listed keys, a floor both tools share (our client
adds 2.0-2.5 ms per object; benchmarks/RESULTS.md, ## ingest).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from occ_core.s3server import start_s3_server, upload_tree

AIMS = {"cold": 2.0, "no-op": 3.0}
BUCKET, PREFIX = "occ-bench", "obman"
_SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
_FOLDERS = (("rgb", "jpg"), ("segm", "png"), ("depth", "png"), ("meta", "pkl"))


def write_dataset(root: Path, n: int, mean_size: int, seed: int = 0) -> int:
    """Write ``n`` files of random bytes in the ObMan layout under ``root``; returns the total bytes."""
    rng = random.Random(seed)
    total = 0
    for i in range(n):
        split = rng.choices([name for name, _ in _SPLITS], weights=[w for _, w in _SPLITS])[0]
        folder, suffix = _FOLDERS[i % len(_FOLDERS)]
        path = root / split / folder / f"{i // len(_FOLDERS):08d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(mean_size // 2, mean_size * 3 // 2))
        path.write_bytes(data)
        total += len(data)
    return total


def tree_digest(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root``, hidden files (the manifest) left out."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc); 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    wall: float
    server_cpu: float


def run_timed(command: list[str], env: dict[str, str], server_pid: int) -> Timing:
    """Run ``command`` to completion; wall seconds, and the server's CPU seconds meanwhile."""
    cpu_before = cpu_seconds(server_pid)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return Timing(wall, cpu_seconds(server_pid) - cpu_before)


def bench_environment(scratch: Path, server_env: dict[str, str]) -> dict[str, str]:
    """The caller's environment with the local server's credentials, and no AWS settings of the user."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "OCC_"))}
    env |= server_env
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(scratch / "no-aws-config")
    return env


def commands(endpoint: str, dest: Path) -> dict[str, list[str]]:
    """The two commands under test, mirroring the same prefix into ``dest``."""
    bin_dir = Path(sys.executable).parent
    source = f"s3://{BUCKET}/{PREFIX}"
    return {
        "aws s3 sync": [
            str(bin_dir / "aws"),
            "s3",
            "sync",
            source,
            str(dest / "aws"),
            "--endpoint-url",
            endpoint,
            "--only-show-errors",
        ],
        "occ ingest": [
            str(bin_dir / "occ"),
            "ingest",
            source,
            "--dest",
            str(dest / "occ"),
            "--endpoint-url",
            endpoint,
            "--quiet",
        ],
    }


def format_table(
    results: dict[str, dict[str, Timing]], n: int, total: int, repeats: int, endpoint: str
) -> str:
    aws, occ = results["aws s3 sync"], results["occ ingest"]
    lines = [
        f"ingest benchmark: {n} objects ({total / 1e6:.1f} MB) on moto at {endpoint}, best of {repeats}",
        f"{'':8}{'aws s3 sync':>13}{'occ ingest':>13}{'aws/occ':>10}{'aim':>8}   "
        f"{'server CPU s (aws / occ)':>24}",
    ]
    for phase, aim in AIMS.items():
        ratio = aws[phase].wall / occ[phase].wall
        verdict = "met" if ratio >= aim else "NOT met"
        lines.append(
            f"{phase:8}{aws[phase].wall:11.2f} s{occ[phase].wall:11.2f} s{ratio:9.2f}x"
            f"{f'>= {aim:g}x':>8} {verdict:8}"
            f"{aws[phase].server_cpu:10.2f} / {occ[phase].server_cpu:.2f}"
        )
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n", default=2000, show_default=True, type=click.IntRange(1), help="objects to sync")
@click.option(
    "--size", default=3000, show_default=True, type=click.IntRange(2), help="mean object size in bytes"
)
@click.option(
    "--repeats", default=3, show_default=True, type=click.IntRange(1), help="runs per measurement (best kept)"
)
def cli(n: int, size: int, repeats: int) -> None:
    """Time occ ingest against aws s3 sync, cold and no-op, and print the ratios."""
    scratch = Path(tempfile.mkdtemp(prefix="occ-bench-ingest-"))
    try:
        total = write_dataset(scratch / "source", n, size)
        with start_s3_server() as server:
            upload = upload_tree(scratch / "source", BUCKET, PREFIX, server.endpoint_url)
            click.echo(f"uploaded {upload.objects} objects in {upload.seconds:.1f} s", err=True)
            env = bench_environment(scratch, server.env)
            runs = commands(server.endpoint_url, scratch / "dest")
            results: dict[str, dict[str, Timing]] = {tool: {} for tool in runs}
            for phase in AIMS:
                timings: dict[str, list[Timing]] = {tool: [] for tool in runs}
                for _ in range(repeats):
                    for tool, command in runs.items():
                        if phase == "cold":
                            shutil.rmtree(scratch / "dest" / tool.split()[0], ignore_errors=True)
                        timings[tool].append(run_timed(command, env, server.process.pid))
                for tool in runs:
                    results[tool][phase] = min(timings[tool], key=lambda timing: timing.wall)
        expected = tree_digest(scratch / "source")
        for tool in runs:
            if tree_digest(scratch / "dest" / tool.split()[0]) != expected:
                raise click.ClickException(f"{tool} did not mirror the source exactly")
        click.echo(format_table(results, n, total, repeats, server.endpoint_url))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    cli()
