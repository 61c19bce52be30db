"""Stage keys and stage reports: what makes a re-run a no-op, and what every stage says when it ends.

A stage writes under ``data_root / stage / key`` where the key hashes the stage's input content, its
parameters and its code version: same inputs, same key, nothing to do; new parameters, a sibling
directory, nothing overwritten.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from occ_core import __version__
from occ_core.fsio import write_jsonl_atomic

if TYPE_CHECKING:
    from occ_core.config import Settings


def code_version(*modules: ModuleType) -> str:
    """Package version plus a hash of the given modules' source: editing the code changes the key."""
    digest = hashlib.sha256(__version__.encode())
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return f"{__version__}+{digest.hexdigest()[:10]}"


def _canonical(params: Any) -> Any:
    if hasattr(params, "model_dump"):
        return params.model_dump(mode="json")
    if isinstance(params, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(params.items())}
    if isinstance(params, (list, tuple)):
        return [_canonical(v) for v in params]
    if isinstance(params, Path):
        return str(params)
    return params


def params_hash(params: Any) -> str:
    """Stable hash of a config model, mapping or plain value."""
    text = json.dumps(_canonical(params), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_key(inputs: Iterable[str], params: Any, code: str) -> str:
    """Key of one stage output: hash of input content hashes (order-free), params and code version."""
    digest = hashlib.sha256()
    for item in sorted(inputs):
        digest.update(item.encode())
        digest.update(b"\0")
    digest.update(params_hash(params).encode())
    digest.update(code.encode())
    return digest.hexdigest()[:16]


def stage_dir(stage: str, key: str, settings: Settings | None = None) -> Path:
    """``data_root / stage / key``: the only place a stage writes."""
    # Imported here: pydantic-settings costs ~0.15 s, and commands that only need StageReport
    # (``occ ingest``, timed against ``aws s3 sync``) never need the settings.
    from occ_core.config import data_root

    return data_root(settings) / stage / key


@dataclass(frozen=True)
class Quarantined:
    """One sample set aside, with the file and the reason."""

    sample_id: str
    path: str
    reason: str


@dataclass
class StageReport:
    """Counts, quarantined samples and timing of one stage run (or one shard of it)."""

    stage: str
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    quarantined: list[Quarantined] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def quarantine(self, sample_id: str, path: Path | str, reason: str) -> None:
        """Record a bad sample; it counts as failed."""
        self.quarantined.append(Quarantined(sample_id, str(path), reason))
        self.failed += 1

    @property
    def total(self) -> int:
        return self.ok + self.skipped + self.failed

    def summary(self) -> dict[str, Any]:
        """One flat row for a table artifact or a terminal summary."""
        return {
            "stage": self.stage,
            "ok": self.ok,
            "skipped": self.skipped,
            "failed": self.failed,
            "quarantined": len(self.quarantined),
            "seconds": round(self.seconds, 3),
            **self.extra,
        }

    def write_quarantine(self, out_dir: Path) -> Path | None:
        """Write ``quarantine.jsonl`` (one record per bad sample) into ``out_dir``, if any."""
        if not self.quarantined:
            return None
        return write_jsonl_atomic(out_dir / "quarantine.jsonl", (asdict(q) for q in self.quarantined))

    @classmethod
    def merge(cls, stage: str, reports: Iterable[StageReport]) -> StageReport:
        """Add shard reports into one; numeric extras are summed, others keep the last value."""
        total = cls(stage)
        for report in reports:
            total.ok += report.ok
            total.skipped += report.skipped
            total.failed += report.failed
            total.quarantined.extend(report.quarantined)
            total.seconds = max(total.seconds, report.seconds)
            for k, v in report.extra.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total.extra[k] = total.extra.get(k, 0) + v
                else:
                    total.extra[k] = v
        return total


class Timer:
    """``with Timer() as t: ...; t.seconds`` - wall time of a block."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
