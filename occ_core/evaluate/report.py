"""The evaluation report: every stage and backend side by side, the paper's table, plots, a gate.

``results`` maps a stage (base, sft1, sft2, mpo, sc; any subset) to a backend (depth, oracle, moho;
any subset) to the scores dict of ``occ_core.evaluate.score.score_files`` (or ``infer.evaluate``),
whose ``files.predictions`` and ``files.truth`` name the rows behind it and whose ``views`` and
``split`` locate the renders. ``build_report`` writes under OUT:

- ``report.json``: one row per stage x backend, the full scores, the claims, the paper's rows;
- ``report.md``: the score table, the claims, the PNGs by relative path, the paper's table below it;
- ``per_class_{backend}.png``: description and decision per class, one bar per stage;
- ``confusion_{backend}.png``: the final-answer confusion matrix of every stage;
- ``examples_{backend}.png``: a few test images, their view-0 render and the three answers.

``promotion_gate`` checks what the method claims of MPO (a better decision score than SFT2's) and
``claims`` says in plain sentences whether the paper's qualitative results hold on these scores.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from occ_core.classes import QA_CLASSES
from occ_core.errors import StageError
from occ_core.fsio import atomic_path, write_json_atomic, write_text_atomic

STAGES: tuple[str, ...] = ("base", "sft1", "sft2", "mpo", "sc")
BACKENDS: tuple[str, ...] = ("depth", "oracle", "moho")
METRICS: tuple[str, ...] = ("description", "reflection", "decision", "three_d_plus")
GateMode = Literal["fail", "warn", "off"]
Results = Mapping[str, Mapping[str, Mapping[str, Any]]]

# Transcribed from docs/method-spec.md section 8 (the OCC-MLLM-CoT README table); None: not reported.
PAPER_SOURCE = (
    "the OCC-MLLM-CoT paper's table (docs/method-spec.md section 8): real ObMan test images, "
    "InternVL2 1B-8B models"
)
_PAPER_TABLE: dict[str, list[tuple[str, float | None, float | None, float]]] = {
    "10K": [
        ("GPT-4V zero-shot", None, None, 0.0361),
        ("GPT-4o zero-shot", None, None, 0.1306),
        ("GPT-4o fine-tuned on 10K", None, None, 0.5532),
        ("Base 1B", None, None, 0.5500),
        ("OCC-MLLM-CoT 1B", 0.6512, 0.6843, 0.6625),
        ("Base 2B", None, None, 0.5524),
        ("OCC-MLLM-CoT 2B", 0.6534, 0.6857, 0.6643),
        ("Base 4B", None, None, 0.5571),
        ("OCC-MLLM-CoT 4B", 0.6561, 0.6872, 0.6654),
        ("Base 8B", None, None, 0.5751),
        ("OCC-MLLM-CoT 8B", 0.6599, 0.7088, 0.6768),
    ],
    "100K": [
        ("MiniGPT4-V2-8B", None, None, 0.3209),
        ("Mini-Gemini-8B", None, None, 0.4981),
        ("Base 1B", None, None, 0.6119),
        ("OCC-MLLM-CoT 1B", 0.6687, 0.6953, 0.6724),
        ("Base 2B", None, None, 0.6189),
        ("OCC-MLLM-CoT 2B", 0.6748, 0.7018, 0.6762),
        ("Base 4B", None, None, 0.6213),
        ("OCC-MLLM-CoT 4B", 0.6835, 0.7042, 0.6921),
        ("Base 8B", None, None, 0.6412),
        ("OCC-MLLM-CoT 8B", 0.7419, 0.7612, 0.7526),
    ],
}
PAPER_ROWS: tuple[dict[str, Any], ...] = tuple(
    {"setting": setting, "model": model, "description": d, "reflection": r, "decision": c}
    for setting, rows in _PAPER_TABLE.items()
    for model, d, r, c in rows
)
PAPER_NOTE = (
    "These are the paper's numbers on real ObMan with InternVL2 models (10K and 100K training rows), "
    "shown as reference only: they are not comparable with a tiny model trained and tested on the "
    "synthetic split."
)

TILE = 160  # side of an image in the example strip, pixels
TEXT_LINES = 5  # lines of text under each example
LINE_HEIGHT = 14
GAP = 6
EMBED_LIMIT = 600_000  # bytes; a larger PNG is linked by path instead of embedded in an artifact


class ReportInputError(ValueError):
    """Results that cannot be reported: an unknown stage or backend, or a scores dict without scores."""


class PromotionError(StageError):
    """MPO does not beat SFT2 on decision (or that cannot be checked) while the gate is in fail mode."""


@dataclass(frozen=True)
class GateResult:
    """The promotion gate's verdict.

    Attributes:
        mode: fail, warn or off.
        passed: True when MPO's decision beats SFT2's; False when not (warn mode); None when the gate is
            off or the scores needed are missing (warn mode).
        message: One line saying which and with which numbers.
        sft2: SFT2's decision score on the backend, when known.
        mpo: MPO's decision score on the backend, when known.
    """

    mode: GateMode
    passed: bool | None
    message: str
    sft2: float | None = None
    mpo: float | None = None


def present(results: Results) -> tuple[list[str], list[str]]:
    """The stages and backends that hold scores, in the report's order.

    Raises:
        ReportInputError: A stage or backend name outside STAGES or BACKENDS, a scores dict without
            the method's scores, or no scores at all.
    """
    for stage, by_backend in results.items():
        if stage not in STAGES:
            raise ReportInputError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        for backend, scores in by_backend.items():
            if backend not in BACKENDS:
                raise ReportInputError(
                    f"{stage}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"
                )
            lacking = [k for k in (*METRICS, "n") if k not in scores]
            if lacking:
                raise ReportInputError(f"{stage}/{backend}: scores lack {', '.join(lacking)}")
    stages = [s for s in STAGES if results.get(s)]
    backends = [b for b in BACKENDS if any(b in results.get(s, {}) for s in stages)]
    if not stages:
        raise ReportInputError("no scores to report: results has no stage with a backend")
    return stages, backends


def _scores(results: Results, stage: str, backend: str) -> Mapping[str, Any] | None:
    return results.get(stage, {}).get(backend)


def score_rows(results: Results) -> list[dict[str, Any]]:
    """One row per stage x backend present: the four scores, n, processed and the predictions file."""
    stages, backends = present(results)
    rows = []
    for stage in stages:
        for backend in backends:
            scores = _scores(results, stage, backend)
            if scores is None:
                continue
            rows.append(
                {
                    "stage": stage,
                    "backend": backend,
                    **{k: scores[k] for k in METRICS},
                    "n": scores["n"],
                    "processed": scores.get("processed"),
                    "predictions": scores.get("files", {}).get("predictions"),
                }
            )
    return rows


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def promotion_gate(results: Results, backend: str, mode: GateMode) -> GateResult:
    """Check that MPO's decision score beats SFT2's on one backend, as the method claims.

    Args:
        results: Stage -> backend -> scores (see the module docstring).
        backend: The backend whose decision scores are compared (oracle, depth or moho).
        mode: fail raises, warn returns the verdict with a message, off checks nothing.
    Returns:
        GateResult; in fail mode only when MPO beats SFT2.
    Raises:
        PromotionError: In fail mode, when MPO's decision is not above SFT2's (both numbers named) or
            when either score is missing.
    """
    if mode == "off":
        return GateResult(mode, None, "promotion gate off: MPO's decision score was not compared with SFT2's")
    sft2, mpo = (_scores(results, stage, backend) for stage in ("sft2", "mpo"))
    absent = [name for name, s in (("sft2", sft2), ("mpo", mpo)) if s is None or s.get("decision") is None]
    if absent:
        message = (
            f"promotion gate ({backend} backend): cannot compare MPO with SFT2, no decision score for "
            f"{' and '.join(absent)}"
        )
        if mode == "fail":
            raise PromotionError(message)
        return GateResult(mode, None, message, sft2 and sft2.get("decision"), mpo and mpo.get("decision"))
    before, after = sft2["decision"], mpo["decision"]
    passed = after > before
    verb = "beats" if passed else "does not beat"
    message = (
        f"promotion gate ({backend} backend): MPO decision {after:.4f} {verb} SFT2 decision {before:.4f}"
    )
    if not passed and mode == "fail":
        raise PromotionError(message)
    return GateResult(mode, passed, message, before, after)


def claims(results: Results) -> list[str]:
    """Plain sentences on whether the paper's qualitative results hold on these scores.

    Two claims: with a hand-free fallback render (the oracle backend), decision >= description for a
    stage; and MPO's reflection >= SFT2's. A claim whose scores are missing says so.
    """
    stages, _ = present(results)
    sentences = []
    oracle = [s for s in stages if _scores(results, s, "oracle")]
    if not oracle:
        sentences.append(
            "Decision >= description with a hand-free render: not checked, no stage was scored with "
            "the oracle backend."
        )
    for stage in oracle:
        scores = _scores(results, stage, "oracle")
        description, decision = scores["description"], scores["decision"]
        if description is None or decision is None:
            sentences.append(
                f"{stage}, oracle render: decision >= description not checked, a score is empty."
            )
            continue
        holds = decision >= description
        sentences.append(
            f"{stage}, oracle render: decision {decision:.4f} {'>=' if holds else '<'} description "
            f"{description:.4f}; the paper's result that a hand-free fallback gives decision >= description "
            f"{'holds' if holds else 'does not hold'} here."
        )
    both = [b for b in BACKENDS if _scores(results, "sft2", b) and _scores(results, "mpo", b)]
    if not both:
        sentences.append("MPO's reflection >= SFT2's: not checked, SFT2 and MPO were not both scored.")
        return sentences
    # Reflection uses only Q1 and the clarity answer on the image, so every backend gives the same
    # number; the first backend scored for both stages stands for all.
    backend = both[0]
    before = _scores(results, "sft2", backend)["reflection"]
    after = _scores(results, "mpo", backend)["reflection"]
    if before is None or after is None:
        sentences.append("MPO's reflection >= SFT2's: not checked, a reflection score is empty.")
    else:
        holds = after >= before
        verdict = "holds" if holds else "does not hold"
        sentences.append(
            f"Reflection ({backend} run): MPO {after:.4f} {'>=' if holds else '<'} SFT2 {before:.4f}; the "
            f"paper's result that MPO's reflection is at least SFT2's {verdict} here."
        )
    return sentences


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def plot_per_class(results: Results, backend: str, path: Path) -> Path:
    """Description and decision accuracy per class on one backend, one bar per stage (PNG)."""
    plt = _pyplot()
    stages = [s for s in STAGES if _scores(results, s, backend)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), squeeze=False)
    width = 0.8 / len(stages)
    # A class absent from the test set has no bar rather than a zero one; its n under it says which.
    counts = _scores(results, stages[0], backend).get("per_class", {})
    ticks = [f"{c}\nn={counts.get(c, {}).get('n', '?')}" for c in QA_CLASSES]
    for ax, metric in zip(axes[0], ("description", "decision"), strict=True):
        for k, stage in enumerate(stages):
            per_class = _scores(results, stage, backend).get("per_class", {})
            values = [per_class.get(c, {}).get(metric) for c in QA_CLASSES]
            values = [float("nan") if v is None else v for v in values]
            ax.bar(
                [i + (k - (len(stages) - 1) / 2) * width for i in range(len(QA_CLASSES))],
                values,
                width,
                label=stage,
            )
        ax.set_xticks(range(len(QA_CLASSES)), ticks, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{metric} per class ({backend})", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    axes[0][1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_confusion(results: Results, backend: str, path: Path) -> Path:
    """The final-answer confusion matrix (truth rows, answer columns) of every stage on one backend."""
    plt = _pyplot()
    stages = [s for s in STAGES if _scores(results, s, backend)]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        confusion = _scores(results, stage, backend).get("confusion", {}).get("final")
        ax.set_title(f"{stage} final answer ({backend})", fontsize=10)
        if not confusion:
            ax.text(0.5, 0.5, "no confusion matrix", ha="center", va="center")
            ax.axis("off")
            continue
        matrix = confusion["matrix"]
        ax.imshow(matrix, cmap="Blues")
        for r, row in enumerate(matrix):
            for c, count in enumerate(row):
                if count:
                    ax.text(c, r, str(count), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(confusion["columns"])), confusion["columns"], rotation=60, fontsize=7)
        ax.set_yticks(range(len(confusion["rows"])), confusion["rows"], fontsize=7)
        ax.set_xlabel("answer", fontsize=8)
        ax.set_ylabel("truth", fontsize=8)
    return _save(fig, path)


def _tile(path: Path | None, label: str) -> Any:
    from PIL import Image, ImageDraw, UnidentifiedImageError

    try:
        if path is None:
            raise FileNotFoundError
        with Image.open(path) as image:
            return image.convert("RGB").resize((TILE, TILE))
    except (OSError, UnidentifiedImageError):
        # A strip is for looking at: an absent image shows as a labelled grey tile, not a failure.
        tile = Image.new("RGB", (TILE, TILE), (96, 96, 96))
        ImageDraw.Draw(tile).text((8, TILE // 2 - 6), label, fill=(255, 255, 255))
        return tile


def _pick(predictions: list[Any], images: Mapping[str, Path], count: int) -> list[Any]:
    # Alternate fallback and non-fallback images so the strip shows the render being used.
    from occ_core.evaluate.score import normalise_clarity

    shown = [p for p in predictions if p.id in images]
    fallback = [p for p in shown if normalise_clarity(p.clarity) == "no"]
    direct = [p for p in shown if normalise_clarity(p.clarity) != "no"]
    picked = [p for pair in zip(fallback, direct, strict=False) for p in pair]
    rest = fallback[len(picked) // 2 :] + direct[len(picked) // 2 :]
    return (picked + rest)[:count]


def _fit(draw: Any, text: str, width: int) -> str:
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def plot_examples(
    scores: Mapping[str, Any], images: Mapping[str, Path], path: Path, title: str, count: int = 4
) -> Path | None:
    """A strip of examples: per test id the input image, its view-0 render and the three answers.

    Args:
        scores: One stage x backend's scores; ``files.predictions`` and ``files.truth`` are read,
            ``views`` and ``split`` locate the renders.
        images: Test id -> input image (e.g. ``{item.id: item.image for item in items}``).
        path: Where the PNG goes.
        title: The strip's heading (stage and backend).
        count: How many test ids to show.
    Returns:
        ``path``, or None when no predicted id has an input image.
    Raises:
        ScoreInputError: The predictions or truth file is unreadable or malformed.
    """
    from PIL import Image, ImageDraw

    from occ_core.evaluate.infer import render_path
    from occ_core.evaluate.score import read_predictions, read_truth

    files = scores.get("files", {})
    truth = read_truth(Path(files["truth"]))
    picked = _pick(read_predictions(Path(files["predictions"]), truth, files["truth"]), images, count)
    if not picked:
        return None
    views, split = scores.get("views"), scores.get("split")
    column = 2 * TILE + GAP
    header = LINE_HEIGHT + GAP
    height = header + TILE + GAP + TEXT_LINES * LINE_HEIGHT + GAP
    strip = Image.new("RGB", (GAP + len(picked) * (column + GAP), height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    draw.text((GAP, GAP // 2), title, fill=(0, 0, 0))
    for k, p in enumerate(picked):
        x = GAP + k * (column + GAP)
        render = render_path(Path(views), p.id, split) if views and split else None
        strip.paste(_tile(Path(images[p.id]), "no image"), (x, header))
        strip.paste(_tile(render, "no render"), (x + TILE + GAP, header))
        right = "right" if p.q1 == truth[p.id] else "wrong"
        render_answer = p.q1_3d if p.q1_3d is not None else "not asked"
        lines = [
            f"{p.id}  truth: {truth[p.id]}",
            f"Q1: {p.q1} ({right})",
            f"clear? {p.clarity!r}",
            f"Q1 on render: {render_answer}",
            "left: input, right: view-0 render",
        ]
        for i, line in enumerate(lines):
            y = header + TILE + GAP + i * LINE_HEIGHT
            draw.text((x, y), _fit(draw, line, column), fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        strip.save(tmp, format="PNG")
    return path


def _image_ref(name: str, embed_dir: Path | None) -> str:
    if embed_dir is None:
        return name
    data = (Path(embed_dir) / name).read_bytes()
    if len(data) > EMBED_LIMIT:
        return name
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def render_markdown(report: Mapping[str, Any], embed_dir: Path | None = None) -> str:
    """The report as markdown: score table, claims, images, and the paper's table as reference.

    Args:
        report: The dict ``build_report`` returns (or report.json read back).
        embed_dir: None: images by relative path (report.md beside them). A directory: images read
            from it and embedded as data URIs (for a Prefect markdown artifact, which cannot reach
            local files); one larger than EMBED_LIMIT bytes stays a path.
    """
    lines = [
        "# Evaluation report",
        "",
        "Description: Q1 accuracy on the processed images. Reflection: the clarity answer agrees with the "
        "model's own Q1 correctness. Decision: final accuracy over all n test images (Q1 when the model "
        "says the object is clear, Q1 on the view-0 render when not). 3D plus: Q1 on the render right "
        "where Q1 on the image was wrong. Rules: docs/method-spec.md section 6.",
        "",
        "| stage | backend | description | reflection | decision | 3D plus | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        scores = " | ".join(_fmt(row[k]) for k in METRICS)
        lines.append(f"| {row['stage']} | {row['backend']} | {scores} | {row['n']} |")
    lines += ["", "## Do the paper's qualitative results hold here?", ""]
    lines += [f"- {sentence}" for sentence in report["claims"]]
    sections = (
        ("per_class", "Per-class accuracy"),
        ("confusion", "Confusion matrices"),
        ("examples", "Examples"),
    )
    for key, heading in sections:
        images = report["images"].get(key, {})
        if images:
            lines += ["", f"## {heading}", ""]
            lines += [f"![{heading}, {b}]({_image_ref(name, embed_dir)})\n" for b, name in images.items()]
    lines += [
        "",
        "## Reference: the paper's table (not comparable)",
        "",
        f"> {report['paper']['note']}",
        "",
        "| setting | model | description | reflection | decision |",
        "|---|---|---|---|---|",
    ]
    for row in report["paper"]["rows"]:
        scores = " | ".join(_fmt(row[k]) for k in ("description", "reflection", "decision"))
        lines.append(f"| {row['setting']} | {row['model']} | {scores} |")
    return "\n".join(lines) + "\n"


def build_report(
    results: Results, out: Path, examples: Mapping[str, Path] | None = None, n_examples: int = 4
) -> dict[str, Any]:
    """Write report.json, report.md and the PNGs under OUT.

    Args:
        results: Stage -> backend -> scores (see the module docstring); any subset of either.
        out: Directory for the report (created if missing).
        examples: Test id -> input image; None: no example strip. The strip of each backend shows the
            answers of the last stage scored on it.
        n_examples: Test ids per strip.
    Returns:
        The report as written to report.json: ``rows`` (score_rows), ``scores`` (the full dicts),
        ``claims``, ``paper`` (source, note, rows), ``images`` (kind -> backend -> file name in OUT).
    Raises:
        ReportInputError: See ``present``.
        ScoreInputError: A predictions or truth file needed for the examples is malformed.
    """
    out = Path(out)
    stages, backends = present(results)
    images: dict[str, dict[str, str]] = {"per_class": {}, "confusion": {}, "examples": {}}
    for backend in backends:
        images["per_class"][backend] = plot_per_class(results, backend, out / f"per_class_{backend}.png").name
        images["confusion"][backend] = plot_confusion(results, backend, out / f"confusion_{backend}.png").name
        last = [s for s in stages if _scores(results, s, backend)][-1]
        scores = _scores(results, last, backend)
        if examples and scores.get("files", {}).get("predictions"):
            strip = plot_examples(
                scores, examples, out / f"examples_{backend}.png", f"{last}, {backend} backend", n_examples
            )
            if strip is not None:
                images["examples"][backend] = strip.name
    report = {
        "stages": stages,
        "backends": backends,
        "rows": score_rows(results),
        "scores": {s: dict(results[s]) for s in stages},
        "claims": claims(results),
        "paper": {"source": PAPER_SOURCE, "note": PAPER_NOTE, "rows": list(PAPER_ROWS)},
        "images": images,
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report))
    return report
