"""Questions, answers and the chain-of-thought datasets of every training stage, in the method's formats.

Command (each run writes OUT.jsonl, OUT.parquet for trl and OUT.meta.json for InternVL)::

    occ cot build --stage {sft1,sft2,cot,sc} --source ROWS.jsonl [--unclear-ids IDS.json] --out OUT.jsonl
        [--allow-degenerate]
    python -m occ_core.cot build ...

ROWS are Q1-format rows ``{"id", "image", "conversations"}`` (a row asking another question is
quarantined); IDS is the upstream list of ids the earlier checkpoint got wrong (``[{"answer": id},
...]``) or a plain JSON list of ids. Given the same inputs the output repeats the upstream file row
for row (docs/method-spec.md sections 1-2). An output with no rows, or an SFT2/CoT output whose
clarity answers are all one, is an error with the counts unless ``--allow-degenerate``. The stages:

- ``sft1``: Q1 and its answer (``train_Q1_10140.jsonl``);
- ``sft2``: Q1, its answer, Q6 and ``No.`` for an unclear image, ``Yes.`` otherwise (``train_Q1_Q6_10140``);
- ``cot``: SFT2 rows of which a seeded fraction is replaced by Q0 and its fixed step-by-step answer
  (``train_Q1_Q6_Q0_4_balanced_10140``; the upstream replacement had no seed);
- ``sc``: Q1 rows for the self-correction stage (``train_Q1_101`` is the first 101 rows: ``--limit 101``).

A sample table (one row per image: ``id``, ``image``, ``cls``, ``unclear``) is turned into rows by
``build_rows``; rows are encoded from one serialised conversation per (turns, class, label), so a
150k-row file costs one string join per row.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from pydantic import BaseModel, ConfigDict, Field

from occ_core.classes import QA_CLASSES, answer_for
from occ_core.config import field_help
from occ_core.errors import BadSample, StageError
from occ_core.fsio import write_json_atomic, write_jsonl_atomic, write_parquet_atomic
from occ_core.jsonl import dumps, iter_jsonl, join_pieces, json_strings, string_array, write_lines_atomic
from occ_core.stage import StageReport, Timer

# Exact strings of the method (docs/method-spec.md section 1). "orignal" is the upstream spelling.
Q1_TEXT = "What's the object in the hand?"
Q6_TEXT = "Is it clear to identify the object in the hand?"
Q0_TEXT = "Please analyze this image step by step."
COT_ANSWER = (
    "Step 1: I will analyze this RGB image and identify the object in the hand. "
    "Step 2: I will assess whether the object in the hand can be clearly identified from the original image. "
    "Step 3: Based on the assessment in Step 2, if clear: I will describe the object based on orignal "
    "features present in the image; if unclear: I will apply a 3D reconstruction model to render an "
    "enhanced version of the image, then use this rendered image to identify the object."
)
RECHECK_TEXT = "Please check again what's the object in the hand?"
YES, NO = "Yes.", "No."
IMAGE_TOKEN = "<image>"

STAGES = ("sft1", "sft2", "cot", "sc")
TURNS: tuple[str, ...] = ("q1", "q1q6", "q0")
SAMPLE_COLUMNS = ("id", "image", "cls", "unclear")
ANSWER_PATTERN = re.compile(r"The object is (?P<cls>.+)\.")
_COT_STREAM = 0xC07  # separates the CoT draw from other seeded draws on the same seed
# trl conversational column: a list of {role, content} messages with plain-text content.
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# trl language-modelling column: the whole conversation, content as text and image blocks in place.
BLOCKS = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
CHAT = pa.list_(pa.struct([("role", pa.string()), ("content", BLOCKS)]))
ROLES = {"human": "user", "gpt": "assistant"}


class Prompts(BaseModel):
    """The question registry: every question string, with the upstream variants as defaults."""

    model_config = ConfigDict(frozen=True)

    q1: str = Field(
        Q1_TEXT, description="Q1, the description question; its answer is 'The object is {class}.'"
    )
    q6: str = Field(Q6_TEXT, description="Q6, the clarity question asked after Q1; answered 'Yes.' or 'No.'")
    q0: str = Field(Q0_TEXT, description="Q0, the step-by-step CoT prompt")
    cot_answer: str = Field(COT_ANSWER, description="the fixed answer to Q0 (upstream typo 'orignal' kept)")
    recheck: str = Field(
        RECHECK_TEXT, description="the self-correction re-ask that replaces Q1 on the 2nd attempt"
    )
    q2: str | None = Field(None, description="Q2 text; unknown upstream (method-spec 1), unused by any stage")
    q3: str | None = Field(None, description="Q3 text; unknown upstream, unused by any stage")
    q4: str | None = Field(None, description="Q4 text; unknown upstream, unused by any stage")
    q5: str | None = Field(None, description="Q5 text; unknown upstream, unused by any stage")
    image_token: str = Field(IMAGE_TOKEN, description="InternVL image placeholder in a human turn")
    image_after_text: bool = Field(
        True,
        description="image token after the question ('Q\\n<image>', upstream) or before it ('<image>\\nQ')",
    )
    pair_question_newline: bool = Field(
        True,
        description="end the clarity question of preference pairs with '\\n', as the upstream DPO files do",
    )

    def question(self, key: str) -> str:
        """The text of question ``Q0``..``Q6`` or ``SC`` (the re-ask); an unset Q2-Q5 slot is an error."""
        texts = {
            "Q0": self.q0,
            "Q1": self.q1,
            "Q2": self.q2,
            "Q3": self.q3,
            "Q4": self.q4,
            "Q5": self.q5,
            "Q6": self.q6,
            "SC": self.recheck,
        }
        if key not in texts:
            raise KeyError(f"unknown question {key!r}; expected one of {', '.join(texts)}")
        if texts[key] is None:
            raise KeyError(
                f"question {key} has no text: its upstream wording is unknown; set Prompts.{key.lower()}"
            )
        return texts[key]

    def with_image(self, text: str) -> str:
        """A human turn's text carrying the image token on its own line."""
        if self.image_after_text:
            return f"{text}\n{self.image_token}"
        return f"{self.image_token}\n{text}"

    def pair_question(self) -> str:
        """The clarity question as the preference pairs ask it (no image token; the MPO loader adds it)."""
        return self.q6 + ("\n" if self.pair_question_newline else "")


class CotConfig(BaseModel):
    """How the datasets are drawn from the sample table."""

    model_config = ConfigDict(frozen=True)

    cot_fraction: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="share of SFT2 rows whose conversation becomes Q0 and its fixed answer (upstream: 25.7%)",
    )
    seed: int = Field(
        0, ge=0, description="seed of every random choice (CoT rows, balancing); part of the stage key"
    )
    allow_degenerate: bool = Field(
        False,
        description="write an output that has no rows or one clarity answer only, instead of failing",
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="keep only the first N source rows (upstream SC file: the first 101); None keeps all",
    )
    prompts: Prompts = Field(
        default_factory=Prompts, description="question strings and their upstream variants"
    )


def clarity_answer(unclear: bool) -> str:
    """``No.`` for an unclear image, ``Yes.`` for a clear one."""
    return NO if unclear else YES


def conversation(prompts: Prompts, turns: str, cls: str | None, unclear: bool | None) -> list[dict[str, str]]:
    """The InternVL ``conversations`` list of one row.

    Args:
        prompts: Question strings.
        turns: ``q1`` (description), ``q1q6`` (description then clarity) or ``q0`` (CoT prompt).
        cls: QA class of the object (unused for ``q0``).
        unclear: Clarity label (used for ``q1q6`` only).
    """
    if turns == "q0":
        return [
            {"from": "human", "value": prompts.with_image(prompts.q0)},
            {"from": "gpt", "value": prompts.cot_answer},
        ]
    described = [
        {"from": "human", "value": prompts.with_image(prompts.q1)},
        {"from": "gpt", "value": answer_for(cls)},
    ]
    if turns == "q1":
        return described
    if turns == "q1q6":
        if unclear is None:
            raise ValueError("a Q1+Q6 conversation needs a clarity label")
        return described + [
            {"from": "human", "value": prompts.q6},
            {"from": "gpt", "value": clarity_answer(unclear)},
        ]
    raise ValueError(f"unknown turns {turns!r}; expected one of {', '.join(TURNS)}")


def chat_messages(prompts: Prompts, turns: str, cls: str | None, unclear: bool | None) -> tuple[list, list]:
    """The same conversation as trl ``(prompt, completion)`` messages, image tokens left to the processor."""
    strip = prompts.image_token
    messages = [
        {
            "role": "user" if turn["from"] == "human" else "assistant",
            "content": turn["value"].replace(strip, "").strip(),
        }
        for turn in conversation(prompts, turns, cls, unclear)
    ]
    return messages[:-1], messages[-1:]


def content_blocks(text: str, image_token: str = IMAGE_TOKEN) -> list[dict[str, str | None]]:
    """A turn's text as structured content: text pieces, and an image block where ``image_token`` stood."""
    blocks: list[dict[str, str | None]] = []
    for i, piece in enumerate(text.split(image_token)):
        if i:
            blocks.append({"type": "image", "text": None})
        if piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


def conversation_messages(conversations: list[dict[str, str]], image_token: str = IMAGE_TOKEN) -> list[dict]:
    """InternVL ``conversations`` turns as chat messages whose content keeps the image in its place.

    With trl's ``assistant_only_loss`` every assistant turn of these messages is trained (SFT2: the Q1
    answer and the clarity answer), unlike a prompt-completion row, which trains the last answer only.
    """
    return [
        {"role": ROLES[t["from"]], "content": content_blocks(t["value"], image_token)} for t in conversations
    ]


# --- reading sources ---------------------------------------------------------------------------------


def sample_table(ids: Any, images: Any, classes: Any, unclear: Any) -> pd.DataFrame:
    """One row per image: ``id``, ``image`` (file name under the image root), ``cls``, ``unclear``.

    Each argument is a list or an array (Arrow or pandas) of equal length; ``unclear`` may hold None.
    """
    return pd.DataFrame(
        {
            "id": pd.array(ids, dtype="string"),
            "image": pd.array(images, dtype="string"),
            "cls": pd.array(classes, dtype="string"),
            "unclear": pd.array(unclear, dtype="boolean"),
        }
    )


def read_rows(
    path: Path | str, prompts: Prompts | None = None, image_root: Path | None = None
) -> tuple[pd.DataFrame, StageReport]:
    """Read Q1-format rows (SFT2 rows too) into a sample table; bad rows are quarantined, never fatal.

    A row is a Q1 row: its first turn asks Q1 (the image token aside) and its second answers
    ``The object is <class>.``; a row asking anything else is quarantined, not turned into Q1. It keeps
    its clarity label when its turns 3-4 are Q6 and ``Yes.``/``No.``. A well-formed file is parsed by
    Arrow in one go; a file with a malformed, blank or mistyped line is parsed line by line. Either way
    the rows then go through one validator (check_source_rows), and every fault names its line.

    Args:
        path: JSONL of ``{id, image, conversations}`` rows.
        prompts: Question strings (to recognise Q1 and the clarity turn).
        image_root: When given, a row whose image file is missing under it is quarantined.
    Returns:
        The sample table (input order) and a report counting rows read and quarantined with reasons:
        malformed JSON or mistyped fields (with the line number), bad fields, a question other than Q1,
        unknown class, duplicate id, missing image.
    """
    path, prompts = Path(path), prompts or Prompts()
    table, lines, faults = _parse_source(path)
    samples, row_faults = check_source_rows(table, lines, path, prompts)
    return _drop_duplicates_and_missing(samples, faults + row_faults, path, image_root)


SOURCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
    ]
)
Fault = tuple[int, str | None, str, str]  # line, sample id, file, reason


def _parse_whole_file(path: Path) -> pa.Table | None:
    # Arrow parses the whole file in C++ but cannot name a malformed line and skips blank lines:
    # any doubt sends the file to the line-by-line parser.
    data = path.read_bytes()
    try:
        table = pj.read_json(
            io.BytesIO(data),
            parse_options=pj.ParseOptions(explicit_schema=SOURCE_SCHEMA, unexpected_field_behavior="ignore"),
        )
    except pa.ArrowException:
        return None
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return table if table.num_rows == lines else None


def _parse_source(path: Path) -> tuple[pa.Table, np.ndarray, list[Fault]]:
    """The rows of a source file as one SOURCE_SCHEMA table, their line numbers, and the lines that are
    no such row (malformed JSON, not an object, fields of the wrong type)."""
    whole = _parse_whole_file(path)
    if whole is not None:
        return whole, np.arange(1, whole.num_rows + 1), []
    rows, lines, faults = [], [], []
    for number, row in iter_jsonl(path):
        if isinstance(row, BadSample):
            faults.append((number, None, row.path, row.reason))
        else:
            rows.append(row)
            lines.append(number)
    try:
        return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), np.array(lines, dtype=np.int64), faults
    except (pa.ArrowException, TypeError, ValueError):
        pass  # some row has a field of the wrong type: find which, row by row
    tables, kept = [], []
    for number, row in zip(lines, rows, strict=True):
        try:
            tables.append(pa.Table.from_pylist([row], schema=SOURCE_SCHEMA))
            kept.append(number)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            sample_id = row.get("id") if isinstance(row.get("id"), str) else None
            faults.append((number, sample_id, str(path), f"line {number}: fields of the wrong type ({exc})"))
    table = pa.concat_tables(tables) if tables else SOURCE_SCHEMA.empty_table()
    return table, np.array(kept, dtype=np.int64), faults


def _turn_field(conv: pa.ListArray, lengths: np.ndarray, k: int, field: str) -> pa.Array:
    """Field ``from``/``value`` of turn ``k`` of every row; null where the row has no such turn."""
    present = lengths > k
    if not present.any():
        return pa.nulls(len(lengths), pa.string())
    picked = pc.struct_field(conv.values, field).take(
        pa.array(np.where(present, conv.offsets.to_numpy()[:-1] + k, 0))
    )
    return pc.if_else(pa.array(present), picked, pa.scalar(None, pa.string()))


def check_source_rows(
    table: pa.Table, lines: np.ndarray, path: Path, prompts: Prompts
) -> tuple[pd.DataFrame, list[Fault]]:
    """The one validator of source rows: column-wise checks, the first one a row fails is its reason.

    Args:
        table: Rows in SOURCE_SCHEMA.
        lines: Each row's line number in ``path``.
        path: The source file, named in every fault.
        prompts: Q1 and Q6 texts.
    Returns:
        The good rows (``line``, ``id``, ``image``, ``cls``, ``unclear``) in input order, and one fault
        per bad row: (line, id or None, file, reason).
    """
    conv = table.column("conversations").combine_chunks()
    ids, images = table.column("id").combine_chunks(), table.column("image").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(conv), 0).to_numpy(zero_copy_only=False)
    null_values = np.r_[
        0, np.cumsum(pc.is_null(pc.struct_field(conv.values, "value")).to_numpy(zero_copy_only=False))
    ]
    offsets = conv.offsets.to_numpy()
    question, answer = _turn_field(conv, lengths, 0, "value"), _turn_field(conv, lengths, 1, "value")
    # Q1 with the image token after it (upstream), before it, or left out: the encoder rewrites the turn.
    q1_forms = pa.array(
        [f"{prompts.q1}\n{prompts.image_token}", f"{prompts.image_token}\n{prompts.q1}", prompts.q1]
    )
    cls = pc.struct_field(pc.extract_regex(answer, f"^{ANSWER_PATTERN.pattern}$"), "cls")
    asks_clarity = (lengths >= 4) & _true(pc.equal(_turn_field(conv, lengths, 2, "value"), prompts.q6))
    clarity = _turn_field(conv, lengths, 3, "value")
    # (passes, reason of a row that fails), in the order a row is judged.
    checks: list[tuple[np.ndarray, Any]] = [
        (
            _true(pc.greater(pc.utf8_length(ids), 0)),
            lambda i: f"'id' must be a non-empty string, got {ids[i].as_py()!r}",
        ),
        (
            _true(pc.greater(pc.utf8_length(images), 0)),
            lambda i: f"'image' must be a non-empty string, got {images[i].as_py()!r}",
        ),
        (
            (lengths >= 2) & (null_values[offsets[1:]] == null_values[offsets[:-1]]),
            lambda i: "'conversations' must hold at least 2 turns with a 'value'",
        ),
        (
            _true(pc.equal(_turn_field(conv, lengths, 0, "from"), "human"))
            & _true(pc.equal(_turn_field(conv, lengths, 1, "from"), "gpt")),
            lambda i: "the first two turns must be from 'human' then 'gpt'",
        ),
        (
            _true(pc.is_in(question, value_set=q1_forms)),
            lambda i: f"question {question[i].as_py()!r} is not Q1 ({prompts.q1!r})",
        ),
        (_true(pc.is_valid(cls)), lambda i: f"answer {answer[i].as_py()!r} is not 'The object is <class>.'"),
        (
            _true(pc.is_in(cls, value_set=pa.array(QA_CLASSES))),
            lambda i: f"unknown class {cls[i].as_py()!r}; expected one of {', '.join(QA_CLASSES)}",
        ),
        (
            ~asks_clarity | _true(pc.is_in(clarity, value_set=pa.array([YES, NO]))),
            lambda i: f"clarity answer {clarity[i].as_py()!r} is neither 'Yes.' nor 'No.'",
        ),
    ]
    fine = np.ones(len(table), dtype=bool)
    faults: list[Fault] = []
    for passes, reason in checks:
        for index in np.flatnonzero(fine & ~passes):
            sample_id = ids[index].as_py() if checks[0][0][index] else None
            faults.append((int(lines[index]), sample_id, str(path), f"line {lines[index]}: {reason(index)}"))
        fine &= passes
    samples = pd.DataFrame(
        {
            "line": lines[fine],
            "id": pd.array(ids.filter(fine), dtype="string"),
            "image": pd.array(images.filter(fine), dtype="string"),
            "cls": pd.array(cls.filter(fine), dtype="string"),
            "unclear": np.where(asks_clarity, _true(pc.equal(clarity, NO)), None)[fine],
        }
    )
    return samples, faults


def _true(mask: pa.Array) -> np.ndarray:
    """A boolean Arrow mask as numpy, null counting as False."""
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def _drop_duplicates_and_missing(
    samples: pd.DataFrame, faults: list[Fault], path: Path, image_root: Path | None
) -> tuple[pd.DataFrame, StageReport]:
    duplicate = samples["id"].duplicated(keep="first").to_numpy()
    if duplicate.any():
        first_line = dict(zip(samples["id"][~duplicate], samples["line"][~duplicate], strict=True))
        for line, sample_id in samples.loc[duplicate, ["line", "id"]].itertuples(index=False):
            faults.append(
                (
                    line,
                    sample_id,
                    str(path),
                    f"line {line}: duplicate id {sample_id!r} (first on line {first_line[sample_id]})",
                )
            )
        samples = samples[~duplicate]
    if image_root is not None:
        present = np.array([(image_root / name).is_file() for name in samples["image"]], dtype=bool)
        for line, sample_id, image in samples.loc[~present, ["line", "id", "image"]].itertuples(index=False):
            faults.append((line, sample_id, str(image_root / image), f"line {line}: missing image"))
        samples = samples[present]
    report = StageReport("cot-source")
    for line, sample_id, where, reason in sorted(faults, key=lambda fault: fault[0]):
        report.quarantine(sample_id or f"line {line}", where, reason)
    report.ok = len(samples)
    return sample_table(
        samples["id"].array,
        samples["image"].array,
        samples["cls"].array,
        samples["unclear"].to_numpy(dtype=object),
    ), report


def read_unclear_ids(path: Path | str) -> set[str]:
    """Ids the earlier checkpoint answered wrongly: ``[{"answer": id}, ...]`` (upstream) or ``[id, ...]``.

    Raises:
        BadSample: The file is not a JSON list of id strings or ``{"answer": id}`` objects.
    """
    return ids_from_list(read_json(path), path)


def read_json(path: Path | str) -> Any:
    """Parse a JSON file; a file that is not JSON is a BadSample naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadSample(path, f"not valid JSON ({exc})") from exc


def ids_from_list(items: Any, path: Path | str) -> set[str]:
    """The ids of an upstream id list (``[{"answer": id}, ...]``) or a plain list of id strings."""
    if not isinstance(items, list):
        raise BadSample(
            path, f"expected a JSON list of ids or {{'answer': id}} objects, got {type(items).__name__}"
        )
    ids = set()
    for index, item in enumerate(items):
        value = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(value, str) or not value:
            raise BadSample(path, f"item {index}: expected an id string or {{'answer': id}}, got {item!r}")
        ids.add(value)
    return ids


def label_unclear(table: pd.DataFrame, unclear_ids: set[str]) -> pd.DataFrame:
    """The table with ``unclear`` = id is in ``unclear_ids`` (the method's rule, method-spec 2.2)."""
    listed = pc.is_in(string_array(table["id"]), value_set=pa.array(sorted(unclear_ids), pa.string()))
    return table.assign(unclear=pd.array(listed.to_numpy(zero_copy_only=False), dtype="boolean"))


def drop_unlabelled(table: pd.DataFrame, report: StageReport, source: Path | str) -> pd.DataFrame:
    """Quarantine rows without a clarity label (they cannot become SFT2 rows) and return the rest."""
    missing = table["unclear"].isna().to_numpy()
    for sample_id in table["id"][missing]:
        report.quarantine(sample_id, source, "no clarity label: no Q6 turn in the row and not graded")
    report.ok -= int(missing.sum())
    return table[~missing].reset_index(drop=True)


# --- building rows -----------------------------------------------------------------------------------


class DegenerateOutput(StageError):
    """An output that would train nothing: no rows, or a clarity answer that never varies."""


def check_not_degenerate(
    out: Path | str,
    rows: pd.DataFrame,
    report: StageReport,
    *,
    labelled: bool,
    allow: bool = False,
    unit: str = "source row",
    min_label: int = 1,
) -> None:
    """Refuse an output with no rows, or, when ``labelled``, with too few of either clarity label.

    Args:
        out: The output (or input) named in the message.
        rows: The rows the output would be written from (``unclear`` is read when ``labelled``).
        report: The source's report: its counts go into the message.
        labelled: Whether the output carries clarity answers (SFT2, CoT, pairs).
        allow: Let a degenerate output through (``--allow-degenerate``).
        unit: What the report counts, for the message (``source row``, ``sample``).
        min_label: Fewest rows of the rarer clarity label accepted (balancing keeps that many of each).
    Raises:
        DegenerateOutput: Naming the output, the label counts and the source counts.
    """
    no = int(rows["unclear"].sum()) if labelled and len(rows) else 0
    yes = int((~rows["unclear"]).sum()) if labelled and len(rows) else 0
    if not len(rows):
        problem = "no rows"
    elif labelled and min(yes, no) == 0:
        problem = f"one clarity answer only: {yes} 'Yes.', {no} 'No.'"
    elif labelled and min(yes, no) < min_label:
        problem = (
            f"too few {'No.' if no < yes else 'Yes.'!r} to balance: {yes} 'Yes.', {no} 'No.' "
            f"(at least {min_label} of each wanted)"
        )
    else:
        return
    if allow:
        return
    counts = [
        f"{report.total} {unit}{'s' * (report.total != 1)}",
        f"{len(report.quarantined)} quarantined",
    ]
    unmatched = report.extra.get("unclear_ids_unmatched")
    if unmatched:
        counts.append(f"{unmatched} unclear id{' names' if unmatched == 1 else 's name'} no row")
    raise DegenerateOutput(f"{out}: {problem} ({', '.join(counts)}); pass --allow-degenerate to write it")


def build_rows(table: pd.DataFrame, stage: str, cfg: CotConfig | None = None) -> pd.DataFrame:
    """Rows of one dataset: the sample table plus a ``turns`` column saying which conversation each gets.

    Args:
        table: Sample table (``id``, ``image``, ``cls``, ``unclear``).
        stage: ``sft1``, ``sft2``, ``cot`` or ``sc``.
        cfg: CoT fraction, seed and row limit.
    Raises:
        ValueError: Unknown stage, or SFT2/CoT rows without a clarity label.
    """
    cfg = cfg or CotConfig()
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    rows = table.head(cfg.limit) if cfg.limit is not None else table
    if stage in ("sft1", "sc"):
        return rows.assign(turns="q1").reset_index(drop=True)
    if rows["unclear"].isna().any():
        raise ValueError(f"{int(rows['unclear'].isna().sum())} rows have no clarity label; grade them first")
    turns = np.full(len(rows), "q1q6", dtype=object)
    if stage == "cot":
        n_cot = round(cfg.cot_fraction * len(rows))
        turns[np.random.default_rng([cfg.seed, _COT_STREAM]).choice(len(rows), n_cot, replace=False)] = "q0"
    return rows.assign(turns=turns).reset_index(drop=True)


def view3d_rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """Q1 rows asked on each sample's view-0 render (``{id}_0_obman_{split}_rgb_{id}.jpg.png``)."""
    from occ_core.render import view_filename  # render imports trimesh; only 3D-view rows need the name

    renders = pd.array([view_filename(i, split, 0) for i in table["id"]], dtype="string")
    return table.assign(image=renders, turns="q1").reset_index(drop=True)


def check_conversation(turns: list[dict[str, str]], prompts: Prompts) -> None:
    """Schema of one ``conversations`` list: alternating human/gpt, one image token in the first turn only.

    Raises:
        StageError: The conversation breaks the schema (a bug, not bad input).
    """
    roles = [t["from"] for t in turns]
    if not turns or len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2):
        raise StageError(f"conversation turns must alternate human/gpt, got {roles}")
    tokens = [t["value"].count(prompts.image_token) for t in turns]
    if tokens != [1] + [0] * (len(turns) - 1):
        raise StageError(f"the image token must appear once, in the first turn; counts per turn: {tokens}")
    if any(not t["value"] for t in turns):
        raise StageError("empty turn in a conversation")


def check_rows(rows: pd.DataFrame) -> None:
    """Schema of a row table before it is written: unique non-empty ids, images, known classes and turns.

    Raises:
        StageError: Naming the column and the first offending values.
    """
    for column in ("id", "image"):
        values = rows[column]
        if values.isna().any() or (values.str.len() == 0).any():
            raise StageError(f"rows have a missing or empty {column!r}")
    duplicated = rows["id"][rows["id"].duplicated()]
    if len(duplicated):
        raise StageError(f"duplicate ids in rows: {list(duplicated[:5])}")
    unknown = set(rows["cls"].unique()) - set(QA_CLASSES)
    if unknown:
        raise StageError(f"unknown classes in rows: {sorted(unknown)}")
    if "turns" in rows and not set(rows["turns"].unique()) <= set(TURNS):
        raise StageError(f"unknown turns in rows: {sorted(set(rows['turns'].unique()) - set(TURNS))}")


def template_codes(rows: pd.DataFrame) -> tuple[list[tuple[str, str | None, bool | None]], np.ndarray]:
    """The distinct conversations of a row table as (turns, class, label) keys, and each row's key index.

    A row's conversation depends on these three only, and Q0 rows share one; so a 150k-row table has
    at most 8 x 2 + 8 + 1 distinct conversations to build and serialise.
    """
    turns = _index_in(rows["turns"], TURNS)
    cls = np.where(turns == TURNS.index("q0"), 0, _index_in(rows["cls"], QA_CLASSES))
    label = (turns == TURNS.index("q1q6")) & rows["unclear"].fillna(False).to_numpy(dtype=bool)
    codes, positions = np.unique((turns * len(QA_CLASSES) + cls) * 2 + label, return_inverse=True)
    keys = []
    for code in codes.tolist():
        turn, cls_index, unclear = (
            TURNS[code // (2 * len(QA_CLASSES))],
            (code // 2) % len(QA_CLASSES),
            code % 2,
        )
        keys.append(
            (turn, None if turn == "q0" else QA_CLASSES[cls_index], bool(unclear) if turn == "q1q6" else None)
        )
    return keys, positions


def _index_in(values: pd.Series, choices: tuple[str, ...]) -> np.ndarray:
    found = pc.index_in(string_array(values), value_set=pa.array(choices, pa.string()))
    if found.null_count:
        raise StageError(f"values outside {choices}: {sorted(set(values[np.asarray(found.is_null())]))[:5]}")
    return found.to_numpy(zero_copy_only=False)


def encode_rows(rows: pd.DataFrame, prompts: Prompts) -> list[str]:
    """JSONL lines ``{"id", "image", "conversations"}``, byte-identical to ``jsonl.dumps`` of each row."""
    keys, codes = template_codes(rows)
    conversations = []
    for key in keys:
        turns = conversation(prompts, *key)
        check_conversation(turns, prompts)
        conversations.append(dumps(turns))
    return join_pieces(
        [
            '{"id": ',
            json_strings(rows["id"]),
            ', "image": ',
            json_strings(rows["image"]),
            ', "conversations": ',
            pa.array(conversations, pa.string()).take(pa.array(codes)),
            "}",
        ]
    )


def image_paths(images: pd.Series, image_root: Path | None) -> pa.Array:
    """A trl ``images`` column: one-element lists of image paths (under ``image_root`` when given)."""
    paths = string_array(images)
    if image_root is not None:
        paths = pc.binary_join_element_wise(f"{image_root}{os.sep}", paths, "")
    return pa.ListArray.from_arrays(pa.array(np.arange(len(paths) + 1, dtype=np.int32)), paths)


def trl_table(rows: pd.DataFrame, prompts: Prompts, image_root: Path | None) -> pa.Table:
    """trl table: ``id``, ``images``, ``messages`` (language modelling), ``prompt``, ``completion``.

    ``messages`` is the whole conversation with the image in place: train it with
    ``assistant_only_loss=True`` to learn every answer. ``prompt``/``completion`` hold every turn before
    the last answer and that answer, so an SFT2 row is [Q1, answer, Q6] -> [Yes./No.]: only the last
    answer is learned from them.
    """
    keys, codes = template_codes(rows)
    messages = [chat_messages(prompts, *key) for key in keys]
    chats = [conversation_messages(conversation(prompts, *key), prompts.image_token) for key in keys]
    take = pa.array(codes)
    return pa.table(
        {
            "id": string_array(rows["id"]),
            "images": image_paths(rows["image"], image_root),
            "messages": pa.array(chats, CHAT).take(take),
            "prompt": pa.array([m[0] for m in messages], MESSAGES).take(take),
            "completion": pa.array([m[1] for m in messages], MESSAGES).take(take),
        }
    )


def internvl_meta(name: str, annotation: Path, image_root: Path | None, length: int) -> dict[str, Any]:
    """InternVL ``meta.json`` content for one JSONL (the keys its SFT and MPO loaders read)."""
    return {
        name: {
            "root": str(image_root.resolve()) if image_root is not None else "",
            "annotation": str(annotation),
            "data_augment": False,
            "repeat_time": 1,
            "length": length,
        }
    }


def meta_path(jsonl_path: Path) -> Path:
    """``OUT.meta.json`` beside ``OUT.jsonl``."""
    return jsonl_path.with_name(jsonl_path.stem + ".meta.json")


def write_dataset(out: Path, lines: Iterable[str], table: pa.Table, image_root: Path | None) -> int:
    """Write one dataset: ``out`` (JSONL), ``out`` with ``.parquet`` (trl) and ``.meta.json`` (InternVL)."""
    out = Path(out)
    count = write_lines_atomic(out, lines)
    if count != table.num_rows:
        raise StageError(f"{out}: {count} JSONL rows but {table.num_rows} Parquet rows")
    write_parquet_atomic(out.with_suffix(".parquet"), table)
    write_json_atomic(meta_path(out), internvl_meta(out.stem, out.resolve(), image_root, count))
    return count


def write_sidecar_quarantine(out: Path, report: StageReport) -> Path | None:
    """``OUT.quarantine.jsonl`` listing every quarantined row, when there is one."""
    if not report.quarantined:
        return None
    return write_jsonl_atomic(
        out.with_name(out.stem + ".quarantine.jsonl"), (asdict(q) for q in report.quarantined)
    )


class NoClarityLabels(ValueError):
    """SFT2 or CoT rows asked of a source that carries no clarity label and was given no id list."""


def build(
    stage: str,
    source: Path,
    out: Path,
    *,
    unclear_ids: Path | None = None,
    cfg: CotConfig | None = None,
    image_root: Path | None = None,
) -> StageReport:
    """Build one dataset file from Q1-format rows: the library call behind ``occ cot build``.

    Args:
        stage: ``sft1``, ``sft2``, ``cot`` or ``sc``.
        source: Q1-format (or SFT2) rows.
        out: Output JSONL; the Parquet and meta.json go beside it.
        unclear_ids: The id list of the model-errors grader; needed for sft2/cot unless the rows carry Q6.
        cfg: CoT fraction, seed, row limit and prompts.
        image_root: Image folder: rows with a missing image are quarantined; written into meta.json.
    Returns:
        Report with rows written (``ok``), quarantined rows and ``extra`` counts.
    Raises:
        NoClarityLabels: sft2/cot from rows without Q6 and no ``unclear_ids``.
        DegenerateOutput: No rows, or one clarity answer only, and ``cfg.allow_degenerate`` is off;
            nothing is written but the quarantine sidecar.
        BadSample: ``unclear_ids`` is not an id list.
    """
    cfg = cfg or CotConfig()
    with Timer() as timer:
        table, report = read_rows(source, cfg.prompts, image_root)
        if unclear_ids is not None:
            wrong = read_unclear_ids(unclear_ids)
            table = label_unclear(table, wrong)
            report.extra["unclear_ids_unmatched"] = len(wrong - set(table["id"]))
        if stage in ("sft2", "cot"):
            if len(table) and table["unclear"].isna().all():
                raise NoClarityLabels(f"--stage {stage} needs clarity labels: the rows carry no Q6 turn")
            table = drop_unlabelled(table, report, source)
        rows = build_rows(table, stage, cfg)
        check_rows(rows)
        write_sidecar_quarantine(out, report)
        check_not_degenerate(out, rows, report, labelled=stage in ("sft2", "cot"), allow=cfg.allow_degenerate)
        report.ok = write_dataset(
            out, encode_rows(rows, cfg.prompts), trl_table(rows, cfg.prompts, image_root), image_root
        )
    report.seconds = timer.seconds
    report.stage = f"cot-{stage}"
    report.extra.update(turn_counts(rows))
    return report


def turn_counts(rows: pd.DataFrame) -> dict[str, int]:
    """Rows per conversation kind and per clarity answer, for summaries."""
    counts = {f"rows_{k}": int(v) for k, v in rows["turns"].value_counts().items()}
    labelled = rows[rows["turns"] == "q1q6"]
    counts["answer_no"] = int(labelled["unclear"].sum())
    counts["answer_yes"] = int(len(labelled) - counts["answer_no"])
    return counts


@click.group()
def cli() -> None:
    """Build the method's chain-of-thought datasets (SFT1, SFT2, CoT, SC)."""


@cli.command("build")
@click.option("--stage", type=click.Choice(STAGES), required=True, help="which dataset to build")
@click.option(
    "--source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Q1-format rows {id, image, conversations}, one JSON object per line",
)
@click.option(
    "--unclear-ids",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='ids answered wrongly by the earlier checkpoint: [{"answer": id}, ...] or [id, ...]',
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="output JSONL")
@click.option(
    "--cot-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=CotConfig.model_fields["cot_fraction"].default,
    show_default=True,
    help=field_help(CotConfig, "cot_fraction"),
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help=field_help(CotConfig, "seed")
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help=field_help(CotConfig, "limit"))
@click.option(
    "--image-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="image folder: rows whose image is missing there are quarantined; written into meta.json",
)
@click.option("--allow-degenerate", is_flag=True, help=field_help(CotConfig, "allow_degenerate"))
def build_command(
    stage: str,
    source: Path,
    unclear_ids: Path | None,
    out: Path,
    cot_fraction: float,
    seed: int,
    limit: int | None,
    image_root: Path | None,
    allow_degenerate: bool,
) -> None:
    """Write OUT (JSONL), OUT.parquet (trl) and OUT.meta.json (InternVL) for one training stage."""
    cfg = CotConfig(cot_fraction=cot_fraction, seed=seed, limit=limit, allow_degenerate=allow_degenerate)
    try:
        report = build(stage, source, out, unclear_ids=unclear_ids, cfg=cfg, image_root=image_root)
    except BadSample as bad:
        raise click.BadParameter(str(bad), param_hint="--unclear-ids") from bad
    except NoClarityLabels as exc:
        raise click.UsageError(f"{exc}; pass --unclear-ids") from exc
    except DegenerateOutput as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report.summary()))
    for item in report.quarantined[:10]:
        click.echo(f"quarantined {item.sample_id}: {item.path}: {item.reason}", err=True)


if __name__ == "__main__":
    cli()
