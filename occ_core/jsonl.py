"""Streaming JSONL in the byte format of the method's files, and a reader that never stops on a bad line.

The upstream files (``occ-mllm-v1/step*/train_*.jsonl``, written by ``jsonlines`` and by the MPO
``generate_train_json_balanced-dpo.py`` script) are ``json.dumps`` output with the default separators
(``", "`` and ``": "``), non-ASCII text kept as UTF-8, one object per line and a newline after every
line, the last included. ``dumps`` and ``write_lines_atomic`` produce exactly that.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from occ_core.errors import BadSample
from occ_core.fsio import atomic_path


def dumps(obj: Any) -> str:
    """One JSON value in the upstream form: default separators, UTF-8 text not escaped."""
    return json.dumps(obj, ensure_ascii=False)


def string_array(values: Any) -> pa.Array:
    """A string column (list, pandas or Arrow, in one chunk or several) as one Arrow string array."""
    array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.cast(pa.string())


def json_strings(values: Any) -> pa.Array:
    """JSON string literals of a string column, exactly as ``dumps`` writes each value.

    Strings without a quote, backslash or control character are only wrapped in quotes, column-wise;
    a column holding any of those is encoded value by value.
    """
    strings = string_array(values)
    if pc.any(pc.match_substring_regex(strings, r'["\\\x00-\x1f]')).as_py():
        return pa.array([dumps(s) for s in strings.to_pylist()], pa.string())
    return pc.binary_join_element_wise('"', strings, '"', "")


def join_pieces(pieces: list[Any]) -> list[str]:
    """Rows made by concatenating, per row, literal strings and equal-length string columns."""
    return pc.binary_join_element_wise(*pieces, "").to_pylist()


def iter_jsonl(path: Path | str) -> Iterator[tuple[int, dict[str, Any] | BadSample]]:
    """Yield ``(line_number, row)`` for every non-blank line; a bad line yields a ``BadSample`` instead.

    Args:
        path: JSONL file, one JSON object per line.
    Yields:
        The 1-based line number and either the parsed object or a BadSample naming the file, the line
        and the reason (malformed JSON, invalid UTF-8, not an object).
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.rstrip(b"\r\n"))
            except json.JSONDecodeError as exc:
                yield (
                    number,
                    BadSample(path, f"line {number}: malformed JSON ({exc.msg} at column {exc.colno})"),
                )
                continue
            except UnicodeDecodeError:
                yield number, BadSample(path, f"line {number}: not valid UTF-8")
                continue
            if not isinstance(row, dict):
                yield (
                    number,
                    BadSample(path, f"line {number}: expected a JSON object, got {type(row).__name__}"),
                )
                continue
            yield number, row


def write_lines_atomic(path: Path | str, lines: Iterable[str]) -> int:
    """Write already-encoded JSON lines, each followed by a newline, atomically; return the line count."""
    lines = lines if isinstance(lines, list) else list(lines)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        if lines:
            fh.write("\n".join(lines))
            fh.write("\n")
    return len(lines)
