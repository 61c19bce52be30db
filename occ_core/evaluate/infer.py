"""The method's evaluation protocol on a checkpoint: Q1, clarity as the second turn, Q1 on the render.

    occ evaluate run --checkpoint C --root ROOT --split test --views V [--out DIR]

Per test image (docs/method-spec.md section 6): Q1 on the image; the clarity question as the second
turn of the same conversation (the model's own Q1 answer as history); when the clarity answer parses
as "no", Q1 again with no history on the view-0 render ``V/{id}_0_obman_{split}_rgb_{id}.jpg.png``.
Decoding is greedy. Each shard asks Q1 of all its images, then the clarity question of all of them,
then Q1 of all its renders, many per ``generate`` call (left-padded, ``batch_size`` at a time).

Shards (``shard_size`` images in id order) are written atomically to ``OUT/shards/`` with the settings
they were made with in ``OUT/shards/plan.json``: a killed run re-run with the same settings computes
only the missing shards; other settings into the same OUT are refused.

The clarity question has three upstream forms (method-spec section 1): ``inf`` (the default), the
"??" + newline of the original per-stage evaluation script ``inferenceImageAcc.py``, which produced
the published scores; ``inf2``, "?" + newline, of the later ``inference.py``; ``train``, the text the
SFT2 rows train on, without a newline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from occ_core import obman
from occ_core.classes import answer_for
from occ_core.cot import Q6_TEXT, Prompts, content_blocks
from occ_core.errors import BadSample, StageError
from occ_core.evaluate.score import SHOWN_IDS, normalise_clarity, score_files
from occ_core.fsio import sha256_file, write_json_atomic, write_jsonl_atomic
from occ_core.jsonl import iter_jsonl
from occ_core.splits import SplitName

log = logging.getLogger(__name__)

ClarityPrompt = Literal["inf", "inf2", "train"]
CLARITY_SUFFIX: dict[str, str] = {"inf": "?\n", "inf2": "\n", "train": ""}
SHARDS = "shards"
PLAN = "plan.json"


class InferConfig(BaseModel):
    """How the protocol is run; every field but ``batch_size`` and ``device`` can change the answers."""

    model_config = ConfigDict(frozen=True)

    clarity_prompt: ClarityPrompt = Field(
        "inf",
        description="clarity question form: inf ('??\\n', the original evaluation script, upstream "
        "default), inf2 ('?\\n', inference.py), train (as SFT2 trains it, no newline)",
    )
    fallback: Literal["no", "all"] = Field(
        "no",
        description="ask Q1 on the render when clarity says no (upstream), or for every image (3D plus "
        "then is the fallback's oracle bound); the decision score uses the render only on 'no' either way",
    )
    batch_size: int = Field(32, ge=1, description="images per generate call")
    shard_size: int = Field(256, ge=1, description="images per resumable shard file")
    max_new_tokens: int = Field(
        32,
        ge=1,
        description="tokens generated per answer (upstream 1024; a longer answer than 32 tokens can never "
        "equal a truth string or Yes./No., so the scores are the same)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    preset: str | None = Field(
        None, description="preset of the checkpoint's chat template family; default: its card's, else tiny"
    )

    def clarity_question(self) -> str:
        """The clarity question text of the chosen upstream form."""
        return Q6_TEXT + CLARITY_SUFFIX[self.clarity_prompt]

    def plan_params(self) -> dict[str, Any]:
        """The settings that decide the answers (what a resumed run must share with the first one)."""
        return self.model_dump(mode="json", exclude={"batch_size", "device"})


@dataclass(frozen=True)
class TestItem:
    """One test image and its truth answer."""

    id: str
    image: Path
    answer: str


@dataclass
class InferResult:
    """What a run wrote and did: the two files, shards computed and reused, counted warnings."""

    predictions: Path
    truth: Path
    computed: list[int]
    reused: list[int]
    warnings: dict[str, Any] = field(default_factory=dict)


def items_from_root(root: Path, split: SplitName) -> tuple[list[TestItem], list[BadSample]]:
    """Every frame of an ObMan split with its answer from its meta; frames without one are returned apart.

    Returns:
        The test items in id order, and one BadSample (file, reason, id) per frame whose meta is missing,
        corrupt or of no QA class: it has no truth answer, so it cannot be scored.
    """
    items, excluded = [], []
    for ref in obman.list_samples(Path(root), split):
        try:
            cls = obman.qa_class(obman.load_meta(ref.meta_path), ref.meta_path)
        except BadSample as bad:
            excluded.append(BadSample(bad.path, bad.reason, ref.sample_id))
            continue
        items.append(TestItem(ref.sample_id, ref.rgb_path, answer_for(cls)))
    return items, excluded


def items_from_dataset(data_dir: Path, name: str = "sft1") -> list[TestItem]:
    """The rows of a datasets-stage file (default its Q1 rows) as test items, images resolved."""
    from occ_core.train.data import load_sft
    from occ_core.train.predict import reference_answers

    rows = load_sft(Path(data_dir), name).rows
    return [
        TestItem(row["id"], Path(row["images"][0]), answer)
        for row, answer in zip(rows, reference_answers(rows), strict=True)
    ]


def render_path(views: Path, sample_id: str, split: str) -> Path:
    """The view-0 render of one sample under a views directory (MOHO's name)."""
    from occ_core.render import view_filename  # render imports trimesh: only here, not at module import

    return Path(views) / view_filename(sample_id, split, 0)


def check_views(views: Path, items: list[TestItem], split: str) -> list[str]:
    """Ids whose view-0 render is absent from ``views``.

    Raises:
        StageError: ``views`` is not a directory, or it holds no render of any test id (a wrong
            directory or split), naming the file expected for the first id.
    """
    views = Path(views)
    if not views.is_dir():
        raise StageError(f"{views}: no such views directory")
    missing = [item.id for item in items if not render_path(views, item.id, split).is_file()]
    if items and len(missing) == len(items):
        raise StageError(
            f"{views}: no view-0 render for any of the {len(items)} test ids of split {split!r} "
            f"(expected e.g. {render_path(views, items[0].id, split).name})"
        )
    return missing


def test_set_fingerprint(items: list[TestItem], views: Path, split: str) -> str:
    """Content hash of a test set as the protocol sees it: ids, truth answers, image and render bytes.

    Two runs with the same fingerprint, checkpoint and settings give the same answers, wherever the
    files lie; a re-rendered view or a changed frame changes it. An absent render hashes as absent.
    """
    digest = hashlib.sha256()
    for item in items:
        render = render_path(views, item.id, split)
        digest.update(f"{item.id}\t{item.answer}\t{sha256_file(item.image)}\t".encode())
        digest.update((sha256_file(render) if render.is_file() else "-").encode() + b"\n")
    return digest.hexdigest()


def _unreadable(path: Path) -> str | None:
    # The readers' own decoder, so evaluation refuses what the data stages refuse.
    try:
        obman.read_rgb(path)
    except BadSample as bad:
        return f"{path}: {bad.reason}"
    return None


def _q1_turn(prompts: Prompts) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content_blocks(prompts.with_image(prompts.q1))}]


def _whole(row: dict[str, Any]) -> list[dict[str, Any]]:
    return row["messages"]


TURN_FIELDS = ("id", "q1", "clarity", "error")  # what the first two turns decide, renders aside


def infer_shard(
    policy: Any,
    processor: Any,
    items: list[TestItem],
    views: Path,
    split: str,
    cfg: InferConfig,
    turns: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The protocol on one shard: one batched pass for Q1, one for clarity, one for the renders.

    Args:
        turns: This shard's Q1 and clarity answers from a run with other renders (``TURN_FIELDS``);
            given, only the render pass runs: the first two turns never see a render.
    Returns:
        One row per item, in item order: ``id``, ``q1`` (None: image unreadable), ``clarity`` (raw),
        ``q1_3d`` (None: not asked or no render), ``render`` (the file asked, or None), ``error``.
    """
    from occ_core.train.predict import generate_answers

    q1_turn = _q1_turn(Prompts())

    def ask(prompts: list[tuple[Path, list[dict[str, Any]]]]) -> list[str]:
        asked = [{"images": [str(image)], "messages": messages} for image, messages in prompts]
        return generate_answers(policy, processor, asked, cfg.batch_size, cfg.max_new_tokens, _whole)

    if turns is not None:
        rows = [{**turn, "q1_3d": None, "render": None} for turn in turns]
    else:
        rows = [
            {"id": it.id, "q1": None, "clarity": None, "q1_3d": None, "render": None}
            | {"error": _unreadable(it.image)}
            for it in items
        ]
        ok = [(row, it) for row, it in zip(rows, items, strict=True) if row["error"] is None]
        for (row, _), answer in zip(ok, ask([(it.image, q1_turn) for _, it in ok]), strict=True):
            row["q1"] = answer
        question = {"role": "user", "content": [{"type": "text", "text": cfg.clarity_question()}]}
        history = [
            (
                it.image,
                [*q1_turn, {"role": "assistant", "content": [{"type": "text", "text": row["q1"]}]}, question],
            )
            for row, it in ok
        ]
        for (row, _), answer in zip(ok, ask(history), strict=True):
            row["clarity"] = answer
    ok = [(row, None) for row in rows if row["error"] is None]
    fallback = []
    for row, _ in ok:
        if cfg.fallback == "all" or normalise_clarity(row["clarity"]) == "no":
            render = render_path(views, row["id"], split)
            reason = _unreadable(render)
            if reason:
                row["error"] = f"render: {reason}"
            else:
                row["render"] = str(render)
                fallback.append(row)
    answers = ask([(Path(row["render"]), q1_turn) for row in fallback])
    for row, answer in zip(fallback, answers, strict=True):
        row["q1_3d"] = answer
    return rows


def turns_cache(plan: dict[str, Any]) -> Path:
    """Where the Q1 and clarity answers of a plan are kept for runs with other renders.

    The key leaves out what only the render pass uses (views, fallback), so every backend's
    evaluation of one checkpoint and test set asks the first two turns once; ``plan`` carries the
    images' content hash, since test sets of other seeds reuse the same ids.
    """
    from occ_core.stage import params_hash, stage_dir

    shared = {k: v for k, v in plan.items() if k not in ("views", "fallback")}
    return stage_dir("evaluate", f"turns-{params_hash(shared)[:16]}")


def _shard_path(out: Path, index: int) -> Path:
    return Path(out) / SHARDS / f"shard-{index:05d}.jsonl"


def _finished_shard(path: Path, ids: list[str]) -> list[dict[str, Any]] | None:
    # Shards are written atomically, so an existing file is whole; its ids must still be this shard's.
    if not path.is_file():
        return None
    rows = [row for _, row in iter_jsonl(path) if not isinstance(row, BadSample)]
    return rows if [row.get("id") for row in rows] == ids else None


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = Path(out) / SHARDS / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in {*old, *plan} if old.get(k) != plan.get(k))
        if changed:
            raise StageError(
                f"{path}: {Path(out)} holds shards of another evaluation (differs in {', '.join(changed)}); "
                "use another --out or delete it"
            )
    write_json_atomic(path, plan)


def _load(checkpoint: Path, cfg: InferConfig) -> tuple[Any, Any]:
    import torch

    from occ_core.train.checkpoint import read_card
    from occ_core.train.model import load_model, resolve_device
    from occ_core.train.presets import get_preset

    card = read_card(checkpoint) or {}
    policy, processor = load_model(checkpoint, get_preset(cfg.preset or card.get("preset") or "tiny"))
    device = resolve_device(cfg.device)
    # On a GPU the model answers in bf16, as upstream evaluates; on a CPU in fp32, as it trained there.
    return policy.to(device, dtype=torch.bfloat16 if device == "cuda" else torch.float32), processor


def run_protocol(
    checkpoint: Path, items: list[TestItem], views: Path, split: SplitName, out: Path, cfg: InferConfig
) -> InferResult:
    """Run the protocol on every item, shard by shard, resuming; write predictions and truth under OUT.

    Args:
        checkpoint: A model directory (checked first: config, readable weights, complete).
        items: The test set (items_from_root or items_from_dataset); its size is the decision's N.
        views: Directory of MOHO-named renders (``{id}_0_obman_{split}_rgb_{id}.jpg.png``).
        split: The split name in the render file names.
        out: Output directory: ``predictions.jsonl``, ``truth.jsonl`` and ``shards/``.
        cfg: Protocol settings.
    Returns:
        InferResult; ``warnings`` counts unreadable images, missing renders (listing the first ids).
    Raises:
        CheckpointError: ``checkpoint`` is not a loadable model directory.
        StageError: No test item, a views directory with no render of any id, or OUT holding shards
            made with other settings.
    """
    from occ_core.train.checkpoint import check_model_dir, fingerprint

    if not items:
        raise StageError("no test images to evaluate")
    check_model_dir(checkpoint)
    missing_renders = check_views(views, items, split)
    out = Path(out)
    ids = [item.id for item in items]
    plan = {
        "checkpoint": fingerprint(checkpoint),
        "split": split,
        "views": str(Path(views).resolve()),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        **cfg.plan_params(),
    }
    _check_plan(out, plan)
    images = hashlib.sha256("".join(sha256_file(item.image) for item in items).encode()).hexdigest()
    turns_dir = turns_cache({**plan, "images_sha256": images})
    shards = [items[i : i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    model: tuple[Any, Any] | None = None
    rows, computed, reused = [], [], []
    for index, shard in enumerate(shards):
        path = _shard_path(out, index)
        done = _finished_shard(path, [item.id for item in shard])
        if done is None:
            model = model or _load(checkpoint, cfg)
            ids_of_shard = [item.id for item in shard]
            turns_path = _shard_path(turns_dir, index)
            turns = _finished_shard(turns_path, ids_of_shard)
            done = infer_shard(*model, shard, views, split, cfg, turns)
            write_jsonl_atomic(path, done)
            if turns is None:
                write_jsonl_atomic(turns_path, [{k: row[k] for k in TURN_FIELDS} for row in done])
            computed.append(index)
        else:
            reused.append(index)
        rows += done
    predictions, truth = out / "predictions.jsonl", out / "truth.jsonl"
    write_jsonl_atomic(predictions, rows)
    write_jsonl_atomic(truth, [{"id": item.id, "answer": item.answer} for item in items])
    errors = [row for row in rows if row["error"]]
    unreadable = [row["id"] for row in errors if row["q1"] is None]
    no_render = [row["id"] for row in errors if row["q1"] is not None]
    warnings = {
        "unreadable_images": {"count": len(unreadable), "ids": unreadable[:SHOWN_IDS]},
        "renders_absent_from_views": {"count": len(missing_renders), "ids": missing_renders[:SHOWN_IDS]},
        "fallback_without_render": {"count": len(no_render), "ids": no_render[:SHOWN_IDS]},
    }
    for row in errors[:SHOWN_IDS]:
        log.warning("sample %s: %s", row["id"], row["error"])
    return InferResult(predictions, truth, computed, reused, warnings)


def default_out(checkpoint: Path, source: Path, split: str, views: Path, cfg: InferConfig) -> Path:
    """``data_root/evaluate/<key>``; the key hashes the checkpoint's weights, test source, views, settings."""
    from occ_core.stage import params_hash, stage_dir
    from occ_core.train.checkpoint import check_model_dir, fingerprint

    inputs = {
        "checkpoint": fingerprint(check_model_dir(checkpoint)),
        "source": str(Path(source).resolve()),
        "split": split,
        "views": str(Path(views).resolve()),
        **cfg.plan_params(),
    }
    return stage_dir("evaluate", params_hash(inputs)[:16])


def evaluate(
    checkpoint: Path,
    items: list[TestItem],
    views: Path,
    split: SplitName,
    out: Path,
    cfg: InferConfig,
    excluded: list[BadSample] | None = None,
) -> dict[str, Any]:
    """The whole evaluation: the protocol on every item, files under OUT, the scores.

    Writes ``OUT/predictions.jsonl``, ``OUT/truth.jsonl``, ``OUT/predictions.scores.json`` (the
    returned dict) and ``OUT/predictions.upstream.json`` (``{id: final answer}``).

    Args:
        checkpoint, items, views, split, out, cfg: As run_protocol.
        excluded: Frames left out of ``items`` for having no truth answer (items_from_root), reported.
    Returns:
        The scores (occ_core.evaluate.score.score) plus the checkpoint, settings, shards computed and
        reused, counted warnings, and the frames excluded.
    Raises:
        CheckpointError, StageError: As run_protocol.
    """
    excluded = excluded or []
    for bad in excluded[:SHOWN_IDS]:
        log.warning("sample %s left out of the test set: %s", bad.sample_id, bad)
    result = run_protocol(checkpoint, items, views, split, out, cfg)
    extra = {
        "checkpoint": str(checkpoint),
        "split": split,
        "views": str(views),
        "settings": cfg.model_dump(mode="json"),
        "shards": {"computed": result.computed, "reused": result.reused},
        "warnings": result.warnings,
        "excluded_without_truth": {
            "count": len(excluded),
            "samples": [
                {"id": b.sample_id, "file": b.path, "reason": b.reason} for b in excluded[:SHOWN_IDS]
            ],
        },
    }
    return score_files(result.predictions, result.truth, extra)
