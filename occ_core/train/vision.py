"""Pre-training of the ``tiny`` preset's vision tower on object-only images of the 8 QA classes.

The tiny InternVL cannot learn to see from the few hundred occluded frames of SFT1 (a tower trained
from scratch there never beat the majority class); the method starts from a pre-trained tower, and so
does the tiny preset. This module trains a stock ``InternVLVisionModel`` plus a small head on
``rgb_obj`` frames (object alone, no hand) and, where given, view renders of the training meshes, with
mild augmentation. Images go through the same ``GotOcr2ImageProcessorPil`` as at fine-tuning time.
Only the tower is saved, as a standard Hugging Face directory, with ``occ_card.json`` beside it:
sha256 fingerprint, the command, the synthesis seeds, data sizes and held-out accuracies (object-only,
occluded ``rgb`` frames, renders) and a frozen-tower linear probe on occluded frames.

Run: ``python -m occ_core.train.vision --data ROOT --eval-data HELDOUT --out DIR --device cuda``
(``--max-seconds S`` bounds training by wall time; the card's command replays it with ``--steps N``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from occ_core import obman
from occ_core.classes import QA_CLASSES
from occ_core.config import field_help
from occ_core.render import view_filename
from occ_core.splits import SplitName

# Shape of the tiny tower (kwargs of transformers' InternVLVisionConfig). 64 px in 8 px patches gives
# 8x8 patch tokens, even per side as pixel shuffle (downsample 0.5) needs: 16 image tokens for the LM.
# Hidden 192 matched hidden 256 on held-out frames at half the CPU cost (benchmarks/RESULTS.md).
TINY_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "image_size": [64, 64],
    "patch_size": [8, 8],
    "layer_scale_init_value": 0.1,
    "use_mean_pooling": True,
}
CARD_NAME = "occ_card.json"
WEIGHTS_NAME = "model.safetensors"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
ImageKind = Literal["rgb_obj", "rgb", "render"]


class VisionPretrainConfig(BaseModel):
    """Everything that decides a pre-trained tower (``out`` excepted)."""

    model_config = ConfigDict(frozen=True)

    data: tuple[Path, ...] = Field(description="training dataset roots (ObMan layout, e.g. from occ synth)")
    out: Path = Field(description="directory the tower (config.json, model.safetensors) and card go to")
    split: SplitName = Field("train", description="split of the training roots that is read")
    renders: tuple[Path, ...] = Field(
        (), description="view-render folders of the training roots, one per --data in order (occ render)"
    )
    eval_data: tuple[Path, ...] = Field(
        (), description="held-out roots (other synth seeds, so other meshes) for the accuracies"
    )
    eval_split: SplitName = Field("train", description="split of the held-out roots that is read")
    eval_renders: tuple[Path, ...] = Field(
        (), description="view-render folders of the held-out roots, one per --eval-data in order"
    )
    vision: dict[str, Any] = Field(
        default_factory=dict, description="InternVLVisionConfig kwargs that override TINY_VISION_CONFIG"
    )
    steps: int = Field(1500, ge=1, description="optimiser steps of pre-training")
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="wall-time bound of training: the real step is timed first and the step count "
        "lowered to fit (card: steps.run; its command reproduces the run with --steps N)",
    )
    batch_size: int = Field(256, ge=1, description="images per step")
    learning_rate: float = Field(1e-3, gt=0, description="peak AdamW learning rate (cosine, 5% warm-up)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    augment: Literal["none", "mild"] = Field(
        "mild", description="mild: flips, +-15 degree rotation, 0.85-1.15 scale, 10% shifts, colour jitter"
    )
    blob_probability: float = Field(
        0.0, ge=0, le=1, description="chance per image of painting skin-coloured blobs (a crude hand)"
    )
    hand_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="chance per image of pasting the visible hand of another training frame over it "
        "(its rgb pixels under its segm hand mask); the object pixels of occluded frames are never used",
    )
    probe_frames: int = Field(
        4000, ge=0, description="occluded training frames (rgb) of the frozen-tower linear probe; 0: none"
    )
    seed: int = Field(0, ge=0, description="seed of initialisation, batch order and augmentation")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    storage_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the saved weights"
    )

    @model_validator(mode="after")
    def _renders_match_roots(self) -> VisionPretrainConfig:
        for roots, renders, name in (
            (self.data, self.renders, "renders"),
            (self.eval_data, self.eval_renders, "eval_renders"),
        ):
            if renders and len(renders) != len(roots):
                raise ValueError(
                    f"{name} needs one folder per dataset root ({len(roots)}), got {len(renders)}"
                )
        if not self.data:
            raise ValueError("data needs at least one training root")
        return self

    def vision_config(self) -> dict[str, Any]:
        """TINY_VISION_CONFIG with this run's overrides; patches per side must be even (pixel shuffle)."""
        shape = {**TINY_VISION_CONFIG, **self.vision}
        side, patch = _side(shape["image_size"]), _side(shape["patch_size"])
        if side % patch or (side // patch) % 2:
            raise ValueError(f"image_size {side} / patch_size {patch} must be an even whole number")
        return shape


def _side(value: int | Sequence[int]) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


# --- data -----------------------------------------------------------------------------------------


def labelled_images(
    roots: Sequence[Path], split: str, kind: ImageKind, renders: Sequence[Path] = ()
) -> tuple[list[Path], list[int]]:
    """Image paths of every frame of ``split`` in ``roots`` and their class indices (QA_CLASSES order).

    Args:
        roots: Dataset roots; labels come from each frame's meta pickle.
        split: The split read in every root.
        kind: ``rgb_obj`` (object only), ``rgb`` (hand-occluded) or ``render`` (view 0 in ``renders``).
        renders: With ``kind="render"``, the view folder of each root, in the same order.
    Raises:
        BadSample: A meta pickle is unreadable or names no QA class (the message names the file).
        FileNotFoundError: A listed frame has no image of that kind.
    """
    paths, labels = [], []
    folders = list(renders) if kind == "render" else [None] * len(roots)
    for root, folder in zip(roots, folders, strict=True):
        for sample in obman.list_samples(root, split):
            if kind == "render":
                path = Path(folder) / view_filename(sample.sample_id, split, 0)
            else:
                path = sample.rgb_obj_path if kind == "rgb_obj" else sample.rgb_path
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no {kind} image for sample {sample.sample_id} of {root}")
            paths.append(path)
            labels.append(
                QA_CLASSES.index(obman.qa_class(obman.load_meta(sample.meta_path), sample.meta_path))
            )
    return paths, labels


def preprocess(paths: Sequence[Path], size: int, chunk: int = 512) -> torch.Tensor:
    """Pixel values exactly as the InternVL processor makes them at fine-tuning time (float16, N,3,S,S)."""
    from transformers import GotOcr2ImageProcessorPil

    processor = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False)
    parts = []
    for start in range(0, len(paths), chunk):
        images = []
        for path in paths[start : start + chunk]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        parts.append(processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float16))
    return torch.cat(parts) if parts else torch.zeros(0, 3, size, size, dtype=torch.float16)


def hand_masks(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Visible-hand coverage of each ``segm`` PNG, box-averaged to ``size`` (float16, N,1,S,S in [0, 1])."""
    masks = []
    for path in paths:
        scene = obman.read_segm(path)[:, :, 0]
        hand = Image.fromarray(np.isin(scene, obman.HAND_LABELS).astype(np.uint8) * 255)
        masks.append(np.asarray(hand.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255)
    if not masks:
        return torch.zeros(0, 1, size, size, dtype=torch.float16)
    return torch.from_numpy(np.stack(masks)[:, None]).to(torch.float16)


def hand_layers(roots: Sequence[Path], split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values of every occluded frame of ``split`` and the coverage of its visible hand.

    Only the hand is pasted from these (``augment``): the object under it is hidden by the mask.
    """
    paths, _ = labelled_images(roots, split, "rgb")
    segm = [sample.segm_path for root in roots for sample in obman.list_samples(root, split)]
    return preprocess(paths, size), hand_masks(segm, size)


# --- augmentation ---------------------------------------------------------------------------------


def _skin_blobs(images: torch.Tensor, gen: torch.Generator, probability: float) -> torch.Tensor:
    """Paint 1-4 shaded skin-coloured ellipses (the synth hands' hue range) over some images in [0, 1]."""
    b, _, s, _ = images.shape
    dev = images.device
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, s, device=dev), torch.linspace(-1, 1, s, device=dev), indexing="ij"
    )
    mask = torch.zeros(b, 1, s, s, device=dev)
    for _ in range(4):
        keep = (torch.rand(b, 1, 1, 1, generator=gen, device=dev) < 0.7).float()
        cx, cy = (torch.rand(2, b, 1, 1, 1, generator=gen, device=dev) * 1.4 - 0.7).unbind(0)
        ax = 0.08 + 0.35 * torch.rand(b, 1, 1, 1, generator=gen, device=dev)
        ay = 0.05 + 0.15 * torch.rand(b, 1, 1, 1, generator=gen, device=dev)
        theta = math.pi * torch.rand(b, 1, 1, 1, generator=gen, device=dev)
        u = (xx - cx) * torch.cos(theta) + (yy - cy) * torch.sin(theta)
        v = -(xx - cx) * torch.sin(theta) + (yy - cy) * torch.cos(theta)
        mask = torch.maximum(mask, keep * ((u / ax) ** 2 + (v / ay) ** 2 < 1).float())
    mask = mask * (torch.rand(b, 1, 1, 1, generator=gen, device=dev) < probability).float()
    # HSV with hue in [0.02, 0.09) lies in the red-yellow sextant: r = v, g = v(1 - s(1 - 6h)), b = v(1 - s).
    h = 0.02 + 0.07 * torch.rand(b, 1, 1, 1, generator=gen, device=dev)
    sat = 0.25 + 0.35 * torch.rand(b, 1, 1, 1, generator=gen, device=dev)
    val = 0.35 + 0.6 * torch.rand(b, 1, 1, 1, generator=gen, device=dev)
    colour = torch.cat([val, val * (1 - sat * (1 - 6 * h)), val * (1 - sat)], dim=1)
    shade = 0.75 + 0.25 * (1 - yy.clamp(-1, 1)) / 2  # light from above, as a hand is shaded
    return images * (1 - mask) + mask * colour * shade


def _paste_hands(
    x: torch.Tensor, hands: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator, probability: float
) -> torch.Tensor:
    """Composite the visible hand of a random other frame over a share ``probability`` of ``x``.

    Normalisation is affine per channel, so compositing normalised values equals compositing pixels.
    """
    pixels, coverage = hands
    b, dev = x.shape[0], x.device
    pick = torch.randint(0, len(pixels), (b,), generator=gen, device=dev)
    on = (torch.rand(b, 1, 1, 1, generator=gen, device=dev) < probability).float()
    alpha = coverage[pick].float() * on
    return x * (1 - alpha) + pixels[pick].float() * alpha


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    cfg: VisionPretrainConfig,
    hands: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mild geometric and colour augmentation of normalised pixel values (same shape and dtype).

    ``hands`` (``hand_layers``) are pasted first when ``cfg.hand_probability`` is set, so the hand
    moves with the object under the geometric augmentation.
    """
    if hands is not None and cfg.hand_probability > 0 and len(hands[0]):
        x = _paste_hands(x.float(), hands, gen, cfg.hand_probability).to(x.dtype)
    if cfg.augment == "none" and cfg.blob_probability == 0:
        return x
    b, dev = x.shape[0], x.device
    mean, std = IMAGENET_MEAN.to(dev), IMAGENET_STD.to(dev)
    images = x.float() * std + mean
    if cfg.blob_probability > 0:
        images = _skin_blobs(images, gen, cfg.blob_probability)
    if cfg.augment == "mild":
        rand = torch.rand(b, 7, generator=gen, device=dev)
        angle = (rand[:, 0] * 2 - 1) * math.radians(15)
        scale = 0.85 + 0.3 * rand[:, 1]
        flip = torch.where(rand[:, 2] < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, (rand[:, 3] * 2 - 1) * 0.1], dim=1),
                torch.stack([sin * flip, cos, (rand[:, 4] * 2 - 1) * 0.1], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
        brightness = (0.8 + 0.4 * rand[:, 5]).view(b, 1, 1, 1)
        contrast = (0.8 + 0.4 * rand[:, 6]).view(b, 1, 1, 1)
        gain = 0.92 + 0.16 * torch.rand(b, 3, 1, 1, generator=gen, device=dev)
        grey = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - grey) * contrast + grey) * brightness * gain
    return ((images.clamp(0, 1) - mean) / std).to(x.dtype)


# --- model ----------------------------------------------------------------------------------------


class Classifier(torch.nn.Module):
    """The tower and a LayerNorm + linear head on the mean of its patch tokens (what the projector sees)."""

    def __init__(self, tower: torch.nn.Module, classes: int = len(QA_CLASSES)):
        super().__init__()
        self.tower = tower
        hidden = tower.config.hidden_size
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, classes))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Token 0 is CLS; InternVL's projector drops it and uses the patch tokens of the last layer.
        return self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:].mean(dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def build_tower(shape: dict[str, Any], seed: int) -> torch.nn.Module:
    """A freshly initialised stock ``InternVLVisionModel`` of ``shape``."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    torch.manual_seed(seed)
    return InternVLVisionModel(InternVLVisionConfig(**shape))


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def fit(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: VisionPretrainConfig,
    steps: int,
    learning_rate: float,
    params: Sequence[torch.nn.Parameter] | None = None,
    hands: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[float]:
    """Train ``params`` (default: all of ``model``) with AdamW, cosine schedule and augmentation.

    ``hands`` are the hand layers pasted by ``augment`` (``cfg.hand_probability``).

    Returns:
        The mean loss of each tenth of the run.
    """
    device = x.device
    params = list(params if params is not None else model.parameters())
    optimiser = torch.optim.AdamW(params, lr=learning_rate, weight_decay=cfg.weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model.train()
    losses, curve = [], []
    for step in range(steps):
        index = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen, device=device)
        with _autocast(device):
            logits = model(augment(x[index], gen, cfg, hands).float())
            loss = F.cross_entropy(logits.float(), y[index], label_smoothing=cfg.label_smoothing)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.detach())
        if (step + 1) % max(1, steps // 10) == 0:
            curve.append(round(torch.stack(losses).mean().item(), 4))
            losses = []
    return curve


@torch.no_grad()
def features(model: Classifier, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Mean patch-token features of the tower (float32, N x hidden)."""
    model.eval()
    with _autocast(x.device):
        return torch.cat([model.features(x[i : i + batch].float()).float() for i in range(0, len(x), batch)])


@torch.no_grad()
def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy of the classifier (0 for an empty set)."""
    if not len(x):
        return 0.0
    model.eval()
    with _autocast(x.device):
        hits = sum(
            (model(x[i : i + batch].float()).argmax(-1) == y[i : i + batch]).sum().item()
            for i in range(0, len(x), batch)
        )
    return hits / len(x)


def linear_probe(
    train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, steps: int = 500
) -> float:
    """Accuracy on ``test`` of a multinomial logistic regression fitted on frozen features ``train``."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    a, b = (train - mean) / std, (test - mean) / std
    probe = torch.nn.Linear(a.shape[1], len(QA_CLASSES)).to(a.device)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(probe(a), y_train).backward()
        optimiser.step()
    with torch.no_grad():
        return (probe(b).argmax(-1) == y_test).float().mean().item()


def majority_rate(labels: Sequence[int]) -> float:
    """Share of the most frequent class (0 for no labels)."""
    return float(np.bincount(np.asarray(labels, dtype=int)).max() / len(labels)) if len(labels) else 0.0


# --- the stage ------------------------------------------------------------------------------------


def synth_seeds(roots: Sequence[Path]) -> list[int | None]:
    """The ``occ synth`` seed of each root (from synth_info.json; None where there is none)."""
    seeds = []
    for root in roots:
        info = Path(root) / "synth_info.json"
        seeds.append(json.loads(info.read_text()).get("params", {}).get("seed") if info.is_file() else None)
    return seeds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_within(budget_s: float, spent_s: float, step_s: float, requested: int, margin: float = 0.85) -> int:
    """Steps of ``step_s`` that fit ``margin`` of what is left of ``budget_s`` (1 to ``requested``)."""
    return max(1, min(requested, int((budget_s - spent_s) * margin / step_s)))


def calibrate_steps(
    shape: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: VisionPretrainConfig,
    probe_steps: int = 100,
    margin: float = 0.85,
    hands: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[int, dict[str, float]]:
    """The step count that fits ``cfg.max_seconds`` of training, timed on the real data path.

    A throw-away model of ``shape`` runs ``fit`` on the training set itself (batch sampling,
    augmentation, forward, backward, AdamW): a step on random data or without augmentation once
    came out 37% too fast. The first 10 steps (kernel selection, allocator warm-up) are left out of
    the per-step rate, and the timed steps (``probe_steps`` at most) take about a tenth of the budget
    at most. The calibration's own time is taken from the budget and ``margin`` of the rest is used,
    so that the cosine schedule ends inside the bound. The real run then restarts from the seed, so
    it equals a run of ``--steps`` at the count returned.

    Returns:
        The step count (at most ``cfg.steps``, at least 1) and the card's ``calibrated_step_ms`` and
        ``calibration_seconds``.
    """
    start = time.perf_counter()
    device = x.device
    warm = min(10, cfg.steps)
    model = Classifier(build_tower(shape, cfg.seed)).to(device)
    fit(model, x, y, cfg, warm, cfg.learning_rate, hands=hands)
    _sync(device)
    # The warm-up's rate (an overestimate) caps the timed steps at a tenth of the budget.
    rough = (time.perf_counter() - start) / warm
    timed = max(1, min(probe_steps, cfg.steps, int(0.1 * float(cfg.max_seconds or 0) / rough)))
    tick = time.perf_counter()
    fit(model, x, y, cfg, timed, cfg.learning_rate, hands=hands)
    _sync(device)
    step = (time.perf_counter() - tick) / timed
    del model
    steps = steps_within(float(cfg.max_seconds or 0), time.perf_counter() - start, step, cfg.steps, margin)
    return steps, {
        "calibrated_step_ms": round(step * 1000, 3),
        "calibration_seconds": round(time.perf_counter() - start, 2),
    }


def command_line(cfg: VisionPretrainConfig) -> str:
    """The ``python -m occ_core.train.vision`` command that reproduces ``cfg``."""
    args = ["python", "-m", "occ_core.train.vision"]
    for name, flag in (
        ("data", "--data"),
        ("renders", "--renders"),
        ("eval_data", "--eval-data"),
        ("eval_renders", "--eval-renders"),
    ):
        for path in getattr(cfg, name):
            args += [flag, str(path)]
    args += [
        "--out",
        str(cfg.out),
        "--steps",
        str(cfg.steps),
        "--seed",
        str(cfg.seed),
        "--device",
        cfg.device,
    ]
    defaults = VisionPretrainConfig(data=cfg.data, out=cfg.out)
    for name in (
        "max_seconds",
        "batch_size",
        "learning_rate",
        "augment",
        "blob_probability",
        "hand_probability",
        "probe_frames",
    ):
        if getattr(cfg, name) != getattr(defaults, name):
            args += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    if cfg.vision:
        args += ["--vision", json.dumps(cfg.vision, separators=(",", ":"))]
    return shlex.join(args)


def fingerprint(directory: Path) -> str:
    """sha256 of the saved weights file."""
    return hashlib.sha256((Path(directory) / WEIGHTS_NAME).read_bytes()).hexdigest()


def _load_set(
    roots: Sequence[Path],
    split: str,
    kind: ImageKind,
    renders: Sequence[Path],
    size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not roots or (kind == "render" and not renders):
        return torch.zeros(0, 3, size, size, dtype=torch.float16, device=device), torch.zeros(
            0, dtype=torch.long, device=device
        )
    paths, labels = labelled_images(roots, split, kind, renders)
    return preprocess(paths, size).to(device), torch.tensor(labels, dtype=torch.long, device=device)


def pretrain_vision(cfg: VisionPretrainConfig) -> dict[str, Any]:
    """Pre-train the tiny tower, evaluate it on held-out frames, save the tower and its card.

    Args:
        cfg: Data roots, shape overrides, optimiser and augmentation settings (see VisionPretrainConfig).
    Returns:
        The card written to ``cfg.out/occ_card.json`` (accuracies, data sizes, fingerprint, command).
    Raises:
        BadSample: A frame's meta is unreadable or has no QA class.
        FileNotFoundError: A frame lacks its image.
        ValueError: No training images, or a shape whose patches per side are not even.
    """
    start = time.perf_counter()
    shape = cfg.vision_config()
    size = _side(shape["image_size"])
    device = torch.device(cfg.device)
    x_obj, y_obj = _load_set(cfg.data, cfg.split, "rgb_obj", (), size, device)
    x_ren, y_ren = _load_set(cfg.data, cfg.split, "render", cfg.renders, size, device)
    x, y = torch.cat([x_obj, x_ren]), torch.cat([y_obj, y_ren])
    if not len(x):
        raise ValueError(f"no {cfg.split} frames under {', '.join(map(str, cfg.data))}")
    hands = None
    if cfg.hand_probability > 0:
        pixels, coverage = hand_layers(cfg.data, cfg.split, size)
        hands = (pixels.to(device), coverage.to(device))
    held_out = {
        kind: _load_set(cfg.eval_data, cfg.eval_split, kind, cfg.eval_renders, size, device)
        for kind in ("rgb_obj", "rgb", "render")
    }
    loaded = time.perf_counter()

    steps, calibration = (
        (cfg.steps, {}) if cfg.max_seconds is None else calibrate_steps(shape, x, y, cfg, hands=hands)
    )
    run = cfg.model_copy(update={"steps": steps, "max_seconds": None})  # what the card's command replays
    model = Classifier(build_tower(shape, cfg.seed)).to(device)
    curve = fit(model, x, y, cfg, run.steps, cfg.learning_rate, hands=hands)
    trained = time.perf_counter()

    accuracies = {kind: round(accuracy(model, xs, ys), 4) for kind, (xs, ys) in held_out.items() if len(xs)}
    majority = {kind: round(majority_rate(ys.tolist()), 4) for kind, (xs, ys) in held_out.items() if len(xs)}
    probe: dict[str, Any] = {}
    x_occ, y_occ = held_out["rgb"]
    if cfg.probe_frames and len(x_occ):
        x_pt, y_pt = _load_set(cfg.data, cfg.split, "rgb", (), size, device)
        x_pt, y_pt = x_pt[: cfg.probe_frames], y_pt[: cfg.probe_frames]
        probe = {
            "train_frames": len(x_pt),
            "occluded_accuracy": round(
                linear_probe(features(model, x_pt), y_pt, features(model, x_occ), y_occ), 4
            ),
            "occluded_majority": majority["rgb"],
        }

    out = Path(cfg.out)
    model.tower.to(getattr(torch, cfg.storage_dtype)).save_pretrained(out, safe_serialization=True)
    card = {
        "fingerprint_sha256": fingerprint(out),
        "command": command_line(run),
        "argv": shlex.join(sys.argv),
        "config": cfg.model_dump(mode="json"),
        "vision_config": shape,
        "parameters": sum(p.numel() for p in model.tower.parameters()),
        "steps": {"requested": cfg.steps, "run": run.steps, "max_seconds": cfg.max_seconds, **calibration},
        "synth_seeds": {"train": synth_seeds(cfg.data), "held_out": synth_seeds(cfg.eval_data)},
        "data": {
            "train_rgb_obj": len(x_obj),
            "train_renders": len(x_ren),
            "hand_layers": 0 if hands is None else len(hands[0]),
            **{f"held_out_{kind}": len(xs) for kind, (xs, _) in held_out.items()},
        },
        "held_out_accuracy": accuracies,
        "held_out_majority": majority,
        "linear_probe": probe,
        "loss_curve": curve,
        "seconds": {"load": round(loaded - start, 1), "train": round(trained - loaded, 1)},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --- CLI ------------------------------------------------------------------------------------------

_PATH = click.Path(path_type=Path, exists=True, file_okay=False)


def _field(name: str) -> Any:
    return VisionPretrainConfig.model_fields[name].default


@click.command("vision")
@click.option(
    "--data", type=_PATH, multiple=True, required=True, help=field_help(VisionPretrainConfig, "data")
)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help=field_help(VisionPretrainConfig, "out")
)
@click.option("--renders", type=_PATH, multiple=True, help=field_help(VisionPretrainConfig, "renders"))
@click.option("--eval-data", type=_PATH, multiple=True, help=field_help(VisionPretrainConfig, "eval_data"))
@click.option(
    "--eval-renders", type=_PATH, multiple=True, help=field_help(VisionPretrainConfig, "eval_renders")
)
@click.option(
    "--steps",
    type=int,
    default=_field("steps"),
    show_default=True,
    help=field_help(VisionPretrainConfig, "steps"),
)
@click.option(
    "--max-seconds",
    type=float,
    default=None,
    help=field_help(VisionPretrainConfig, "max_seconds"),
)
@click.option(
    "--batch-size",
    type=int,
    default=_field("batch_size"),
    show_default=True,
    help=field_help(VisionPretrainConfig, "batch_size"),
)
@click.option(
    "--learning-rate",
    type=float,
    default=_field("learning_rate"),
    show_default=True,
    help=field_help(VisionPretrainConfig, "learning_rate"),
)
@click.option(
    "--augment",
    type=click.Choice(["none", "mild"]),
    default=_field("augment"),
    show_default=True,
    help=field_help(VisionPretrainConfig, "augment"),
)
@click.option(
    "--blob-probability",
    type=float,
    default=_field("blob_probability"),
    show_default=True,
    help=field_help(VisionPretrainConfig, "blob_probability"),
)
@click.option(
    "--hand-probability",
    type=float,
    default=_field("hand_probability"),
    show_default=True,
    help=field_help(VisionPretrainConfig, "hand_probability"),
)
@click.option(
    "--probe-frames",
    type=int,
    default=_field("probe_frames"),
    show_default=True,
    help=field_help(VisionPretrainConfig, "probe_frames"),
)
@click.option("--vision", "vision_json", default=None, help="JSON object of InternVLVisionConfig overrides")
@click.option(
    "--seed",
    type=int,
    default=_field("seed"),
    show_default=True,
    help=field_help(VisionPretrainConfig, "seed"),
)
@click.option(
    "--device", default=_field("device"), show_default=True, help=field_help(VisionPretrainConfig, "device")
)
def vision_command(vision_json: str | None, **options: Any) -> None:
    """Pre-train the tiny preset's vision tower on object-only frames and save it with its card."""
    try:
        vision = json.loads(vision_json) if vision_json else {}
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--vision") from None
    if not isinstance(vision, dict):
        raise click.BadParameter("expected a JSON object", param_hint="--vision")
    try:
        cfg = VisionPretrainConfig(vision=vision, **options)
        cfg.vision_config()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"])) or "options"
        raise click.UsageError(f"{where}: {error['msg']}") from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    card = pretrain_vision(cfg)
    click.echo(
        f"saved {cfg.out}  sha256={card['fingerprint_sha256'][:16]}"
        f"  held-out accuracy {card['held_out_accuracy']}"
        f" (majority {card['held_out_majority']})  probe {card['linear_probe']}"
    )


if __name__ == "__main__":
    vision_command()
