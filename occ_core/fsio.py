"""Atomic file writes and content hashes.

Every output goes to a temporary sibling and is renamed into place only when it is complete, so an
interrupted run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20


def temp_sibling(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` on success, delete it on error.

    Use this when a library insists on writing to a path itself (PIL, pyarrow, trimesh).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: Path | str) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears under ``path`` only once it is closed cleanly."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path | str, rows: Any) -> Path:
    """Write an iterable of JSON-serialisable rows, one per line, atomically."""
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False).encode("utf-8"))
            fh.write(b"\n")
    return Path(path)


def write_parquet_atomic(path: Path | str, table: Any, compression: str = "zstd") -> Path:
    """Write a pyarrow Table or pandas DataFrame to Parquet atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(path)


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
