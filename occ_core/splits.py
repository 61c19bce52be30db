"""Split names: one rule for every place a split is accepted (CLI flags, flow forms, readers).

A split is a folder *name*, never a path: ``train``, ``val`` and ``test`` by default, or any other
name of letters, digits, ``_`` and ``-``. A value such as ``../r30/test`` would otherwise end up in
file names (``{id}_0_obman_../r30/...``) and in paths outside the data root.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


def check_split(name: str) -> str:
    """Return ``name`` when it is a valid split name.

    Raises:
        ValueError: The name is empty or holds anything but letters, digits, ``_`` and ``-``.
    """
    if not isinstance(name, str) or not SPLIT_PATTERN.fullmatch(name):
        raise ValueError(
            f"split must be a name of letters, digits, '_' and '-' (e.g. {', '.join(SPLITS)}), got {name!r}"
        )
    return name


SplitName = Annotated[str, AfterValidator(check_split)]
