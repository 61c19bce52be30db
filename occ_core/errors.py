"""Errors that carry the file and the reason, so a quarantine record and a log line say the same thing."""

from __future__ import annotations

from pathlib import Path


class BadSample(ValueError):
    """One input sample cannot be used; the rest of the shard goes on."""

    def __init__(self, path: Path | str, reason: str, sample_id: str | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.sample_id = str(path), reason, sample_id


class StageError(RuntimeError):
    """A whole stage or shard cannot run (missing tool, unwritable output, too many bad samples)."""
