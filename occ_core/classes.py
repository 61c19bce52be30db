"""The 8 QA classes of the method, their ShapeNet synsets and their frequencies in the 10K train set.

Sources: docs/obman-moho.md A5 (synsets) and docs/method-spec.md 2.7 (class counts in OCC's
10,140-row train file, used as the default class priors of the synthetic dataset).
"""

from __future__ import annotations

QA_CLASSES: tuple[str, ...] = ("bottle", "bowl", "can", "jar", "knife", "cellphone", "camera", "remote")

SYNSET_BY_CLASS: dict[str, str] = {
    "bottle": "02876657",
    "bowl": "02880940",
    "can": "02946921",
    "jar": "03593526",
    "knife": "03624134",
    "cellphone": "02992529",
    "camera": "02942699",
    "remote": "04074963",
}
CLASS_BY_SYNSET: dict[str, str] = {v: k for k, v in SYNSET_BY_CLASS.items()}
# ObMan's csvs also list mugs; no QA label exists for them, so readers report them as unknown.
MUG_SYNSET = "03797390"

CLASS_COUNTS_10K: dict[str, int] = {
    "jar": 2720,
    "bottle": 2390,
    "cellphone": 2371,
    "bowl": 734,
    "knife": 720,
    "camera": 513,
    "can": 416,
    "remote": 276,
}


def class_priors() -> dict[str, float]:
    """Class frequencies of the 10K train set, normalised to sum to 1."""
    total = sum(CLASS_COUNTS_10K.values())
    return {name: CLASS_COUNTS_10K[name] / total for name in QA_CLASSES}


def answer_for(class_name: str) -> str:
    """The exact Q1 answer string: ``The object is {class}.``"""
    if class_name not in SYNSET_BY_CLASS:
        raise ValueError(f"unknown QA class {class_name!r}; expected one of {', '.join(QA_CLASSES)}")
    return f"The object is {class_name}."
