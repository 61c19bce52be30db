"""Convert an original InternVL2 checkpoint (remote code) into transformers' native InternVL format.

Command::

    occ model convert --src InternVL2-1B --out InternVL2-1B-hf [--tokenizer NATIVE_TOKENIZER_DIR]
    python -m occ_core.convert convert --src ... --out ...

The released OCC-MLLM-CoT models are InternVL2 ``InternVLChatModel`` directories that need
``trust_remote_code``: InternViT + the ``mlp1`` projector + a Qwen2, InternLM2 or Phi-3 language model.
This reads their ``config.json`` and safetensors directly (no remote code runs, no network) and writes a
directory that stock ``InternVLForConditionalGeneration.from_pretrained`` loads. Tensors are renamed and
split the way transformers' own ``convert_internvl_weights_to_hf.py`` does:

- InternViT: ``vision_model`` -> ``vision_tower``; the fused ``attn.qkv`` is split into ``q/k/v_proj``;
  ``ls1/ls2`` -> ``lambda_1/2``, ``norm1/2`` -> ``layernorm_before/after``,
  ``attn.proj`` -> ``projection_layer``.
- ``mlp1.{0,1,3}`` (LayerNorm, Linear, GELU, Linear) ->
  ``multi_modal_projector.{layer_norm,linear_1,linear_2}``.
- Qwen2 and Phi-3 keep their names (the originals are transformers' own layouts); InternLM2 becomes Llama
  (its fused ``wqkv`` is split per key-value group, ``w1/w3/w2`` -> ``gate/up/down_proj``).

The chat template is the upstream conversation template the checkpoint was trained with (config
``template``: Hermes-2, internlm2-chat, phi3-chat), with its default system message, written as a Jinja
template; generation stops at that template's separator, as the upstream ``chat()`` does. The output
appears only when complete: everything is written to a staging directory renamed onto ``--out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from occ_core.fsio import write_json_atomic

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# InternVLProcessor reads these tokenizer attributes by name.
IMAGE_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": IMAGE_CONTEXT_TOKEN,
}
# The upstream normalisation (InternVL's build_transform): ImageNet mean and std.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Files of the source directory that are not carried over: code, weights, the original config.
NOT_COPIED = re.compile(r".*\.(py|safetensors|bin|pth|pt)$|config\.json$|model\.safetensors\.index\.json$")
PROVENANCE = "occ_convert.json"


class ConvertError(ValueError):
    """The source directory is not a convertible InternVL2 checkpoint; names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


Rules = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Backbone:
    """How one original language model maps onto a native transformers one."""

    name: str
    model_type: str  # the native text_config model_type
    renames: Rules  # regex rules on ``language_model.*`` keys, applied in order
    renamed_config: tuple[tuple[str, str], ...] = ()  # original llm_config key -> native key


INTERNLM2_RENAMES: Rules = (
    (r"\.tok_embeddings\.", ".embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.attention\.wqkv\.", ".self_attn.wqkv."),  # split later, once the config is known
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^language_model\.output\.", "language_model.lm_head."),
)

BACKBONES: dict[str, Backbone] = {
    "Qwen2ForCausalLM": Backbone("Qwen2", "qwen2", ()),
    "InternLM2ForCausalLM": Backbone("InternLM2", "llama", INTERNLM2_RENAMES, (("bias", "attention_bias"),)),
    "Phi3ForCausalLM": Backbone("Phi-3", "phi3", ()),
}

VISION_RENAMES: Rules = (
    (r"^vision_model\.", "vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
)
PROJECTOR_RENAMES: Rules = (
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
)
# Buffers some old checkpoints saved; the native models recompute them.
DROPPED = re.compile(r"\.rotary_emb\.inv_freq$")

# original vision_config key -> InternVLVisionConfig key
VISION_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "norm_type": "norm_type",
    "qkv_bias": "attention_bias",
    "qk_normalization": "use_qk_norm",
    "attention_dropout": "attention_dropout",
    "dropout": "hidden_dropout_prob",
    "initializer_range": "initializer_range",
}
# Keys the strict native configs must not receive: provenance, or settings of the runtime, not the model.
LLM_SKIPPED = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "auto_map"}

# The system message of InternVL2's Hermes-2, internlm2-chat and phi3-chat templates (conversation.py).
DEFAULT_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
    "英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


@dataclass(frozen=True)
class ChatFormat:
    """An upstream InternVL conversation template of the MPT separator style."""

    system: str  # prefix of the system turn
    user: str
    assistant: str
    sep: str  # ends every turn; the upstream chat() stops generating at it


CHATML = ChatFormat("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>")
CHAT_FORMATS = {
    "Hermes-2": CHATML,
    "internlm2-chat": CHATML,
    "phi3-chat": ChatFormat("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>"),
}


def chat_template(fmt: ChatFormat, system_message: str = DEFAULT_SYSTEM) -> str:
    """A Jinja chat template that renders exactly what the upstream ``Conversation.get_prompt`` does.

    MPT style: ``system + sep``, then ``role + text + sep`` per turn with no newline between turns, and
    the assistant role alone as the generation prompt. The upstream default system message is used when
    the conversation has none. An image block becomes ``<IMG_CONTEXT>``, which the processor expands to
    ``<img>`` + one context token per visual token + ``</img>``, as the upstream ``chat()`` does.
    """
    roles = {"user": fmt.user, "assistant": fmt.assistant, "system": fmt.system}
    role_map = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in roles.items())
    default_system = json.dumps(fmt.system + system_message + fmt.sep, ensure_ascii=False)
    return (
        f"{{% set roles = {{{role_map}}} %}}"
        f"{{% if messages[0]['role'] != 'system' %}}{{{{ {default_system} }}}}{{% endif %}}"
        "{% for message in messages %}{{ roles[message['role']] }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for block in message['content'] %}"
        f"{{% if block['type'] == 'image' %}}{IMAGE_CONTEXT_TOKEN}"
        "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}{% endfor %}{% endif %}"
        f"{{{{ {json.dumps(fmt.sep)} }}}}{{% endfor %}}"
        f"{{% if add_generation_prompt %}}{{{{ {json.dumps(fmt.assistant)} }}}}{{% endif %}}"
    )


def apply_rules(key: str, rules: Rules) -> str:
    """``key`` after every regex rule in order."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def rename_key(key: str, backbone: Backbone) -> str | None:
    """The native (saved) name of one original tensor; None for a buffer the native model recomputes.

    Raises:
        KeyError: ``key`` belongs to no part of an InternVL2 checkpoint.
    """
    if DROPPED.search(key):
        return None
    if key.startswith("vision_model."):
        return apply_rules(key, VISION_RENAMES)
    if key.startswith("mlp1."):
        return apply_rules(key, PROJECTOR_RENAMES)
    if key.startswith("language_model."):
        return apply_rules(key, backbone.renames)
    raise KeyError(key)


def split_vision_qkv(fused: Any, hidden_size: int) -> tuple[Any, Any, Any]:
    """InternViT's fused ``attn.qkv`` (weight or bias) as q, k, v: its rows are [q; k; v]."""
    return fused[:hidden_size], fused[hidden_size : 2 * hidden_size], fused[2 * hidden_size :]


def split_internlm2_wqkv(
    fused: Any, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[Any, Any, Any]:
    """InternLM2's fused ``wqkv`` (weight or bias) as q, k, v.

    Its rows are grouped per key-value head: ``groups`` query heads, then that head's key, then its
    value (InternLM2's ``rearrange(..., "(h gs d) -> h gs d", gs=groups + 2)``).
    """
    groups = num_heads // num_kv_heads
    rest = fused.shape[1:]
    grouped = fused.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *rest)
    return (
        q.contiguous(),
        grouped[:, -2].reshape(-1, *rest).contiguous(),
        grouped[:, -1].reshape(-1, *rest).contiguous(),
    )


def convert_tensors(tensors: dict[str, Any], config: Any, backbone: Backbone) -> dict[str, Any]:
    """Original tensors -> native tensors (saved names), fused projections split.

    Works on any tensor-like with ``shape``, slicing and ``reshape``: real tensors, or meta tensors to
    check a conversion before reading any weight.

    Raises:
        KeyError: A tensor belongs to no part of an InternVL2 checkpoint.
    """
    text = config.text_config
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        new = rename_key(key, backbone)
        if new is None:
            continue
        if ".attention.qkv." in new:
            parts = split_vision_qkv(value, config.vision_config.hidden_size)
            out.update({new.replace(".qkv.", f".{p}_proj."): t for p, t in zip("qkv", parts, strict=True)})
        elif ".self_attn.wqkv." in new:
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            parts = split_internlm2_wqkv(value, text.num_attention_heads, text.num_key_value_heads, head_dim)
            out.update({new.replace(".wqkv.", f".{p}_proj."): t for p, t in zip("qkv", parts, strict=True)})
        else:
            out[new] = value
    if config.tie_word_embeddings:
        out.pop("language_model.lm_head.weight", None)  # tied: the native model reuses the embedding
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        ConvertError: The file is missing or not a JSON object.
    """
    if not path.is_file():
        raise ConvertError(path, "missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConvertError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def read_original_config(src: Path) -> dict[str, Any]:
    """The ``config.json`` of an original InternVL2 checkpoint, checked for what conversion needs.

    Raises:
        ConvertError: Not an InternVL2 remote-code checkpoint, or one this converter cannot convert.
    """
    path = src / "config.json"
    config = read_json(path)
    archs = config.get("architectures") or []
    if ORIGINAL_ARCHITECTURE not in archs:
        hint = " (already native?)" if "InternVLForConditionalGeneration" in archs else ""
        raise ConvertError(path, f"architectures is {archs}, not [{ORIGINAL_ARCHITECTURE!r}]{hint}")
    for field in ("vision_config", "llm_config"):
        if not isinstance(config.get(field), dict):
            raise ConvertError(path, f"no {field} object")
    backbone_of(config, path)
    if config.get("ps_version", "v2") != "v2":
        # v1 skips the final transpose of pixel shuffle; the native model implements v2 only.
        raise ConvertError(path, f"ps_version {config['ps_version']!r}: only 'v2' pixel shuffle is native")
    for lora in ("use_backbone_lora", "use_llm_lora"):
        if config.get(lora):
            raise ConvertError(path, f"{lora} is {config[lora]}: merge the LoRA weights before converting")
    if config.get("template") not in CHAT_FORMATS:
        raise ConvertError(path, f"template {config.get('template')!r} is not one of {sorted(CHAT_FORMATS)}")
    return config


def backbone_of(config: dict[str, Any], path: Path) -> Backbone:
    """The language model of an original config.

    Raises:
        ConvertError: The language model is not one this converter maps.
    """
    archs = config["llm_config"].get("architectures") or []
    for arch in archs:
        if arch in BACKBONES:
            return BACKBONES[arch]
    raise ConvertError(
        path,
        f"llm_config.architectures {archs} is not a supported language model (one of {sorted(BACKBONES)})",
    )


def rope_parameters(llm: dict[str, Any]) -> dict[str, Any]:
    """The native ``rope_parameters`` of an original ``rope_theta`` + legacy ``rope_scaling``."""
    scaling = dict(llm.get("rope_scaling") or {})
    legacy_type = scaling.pop("type", None)  # the pre-4.45 name of the key
    rope_type = scaling.pop("rope_type", None) or legacy_type or "default"
    # Phi-3's remote code (InternVL2-4B) calls longrope "su"; transformers renamed it.
    rope_type = "longrope" if rope_type == "su" else rope_type
    params = {"rope_type": rope_type, "rope_theta": float(llm.get("rope_theta", 10000.0)), **scaling}
    if rope_type == "longrope" and "original_max_position_embeddings" in llm:
        params["original_max_position_embeddings"] = llm["original_max_position_embeddings"]
    return params


def text_config(llm: dict[str, Any], backbone: Backbone) -> Any:
    """The native text config of an original ``llm_config``: the fields the native class declares."""
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(backbone.model_type))
    known = {f.name for f in dataclasses.fields(config_class)}
    values = {backbone_key: llm[key] for key, backbone_key in backbone.renamed_config if key in llm}
    values.update({k: v for k, v in llm.items() if k in known and k not in LLM_SKIPPED})
    values["rope_parameters"] = rope_parameters(llm)
    values["use_cache"] = True  # training runs save it off; inference wants it on
    return config_class(**values)


def internvl_config(original: dict[str, Any], backbone: Backbone, image_token_id: int) -> Any:
    """The native ``InternVLConfig`` of an original InternVL2 ``config.json``."""
    from transformers import InternVLConfig, InternVLVisionConfig

    vision = original["vision_config"]
    vision_values = {new: vision[old] for old, new in VISION_FIELDS.items() if old in vision}
    image_size = original.get("force_image_size") or vision.get("image_size", 448)
    vision_values["image_size"] = image_size
    patch = vision.get("patch_size", 14)
    ratio = float(original.get("downsample_ratio", 0.5))
    text = text_config(original["llm_config"], backbone)
    return InternVLConfig(
        vision_config=InternVLVisionConfig(**vision_values, use_absolute_position_embeddings=True),
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int((image_size // patch) ** 2 * ratio**2),
        downsample_ratio=ratio,
        projector_hidden_act="gelu",  # mlp1 is LayerNorm, Linear, nn.GELU(), Linear
        vision_feature_layer=int(original.get("select_layer", -1)),
        vision_feature_select_strategy="default",  # the original drops the CLS token
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        architectures=["InternVLForConditionalGeneration"],
    )


def token_id(tokenizer_dir: Path, token: str) -> int:
    """The id of an added token, read from the tokenizer files (no tokenizer class is loaded).

    Raises:
        ConvertError: No tokenizer file of ``tokenizer_dir`` defines ``token``.
    """
    added = tokenizer_dir / "added_tokens.json"
    if added.is_file() and token in (ids := read_json(added)):
        return int(ids[token])
    config = tokenizer_dir / "tokenizer_config.json"
    if config.is_file():
        for idx, entry in read_json(config).get("added_tokens_decoder", {}).items():
            if entry.get("content") == token:
                return int(idx)
    fast = tokenizer_dir / "tokenizer.json"
    if fast.is_file():
        for entry in read_json(fast).get("added_tokens", []):
            if entry.get("content") == token:
                return int(entry["id"])
    raise ConvertError(config, f"no tokenizer file of {tokenizer_dir} defines the image token {token}")


def weight_shards(src: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it has one.

    Raises:
        ConvertError: No safetensors weights, or an index naming a missing shard.
    """
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not names:
            raise ConvertError(index, "weight_map is empty")
        for name in names:
            if not (src / name).is_file():
                raise ConvertError(src / name, f"missing (listed in {index.name})")
        return [src / name for name in names]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    found = "pytorch_model.bin" if any(src.glob("pytorch_model*.bin")) else "no weights"
    raise ConvertError(single, f"missing ({found}; only safetensors checkpoints are read)")


def shard_keys(shard: Path) -> dict[str, tuple[list[int], str]]:
    """Each tensor's shape and dtype in one safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(shard, framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConvertError(shard, f"not a readable safetensors file ({exc})") from None


def expected_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """The saved tensor names and shapes of a native model of ``config`` (built on the meta device)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    saved = {}
    for key, tensor in model.state_dict().items():
        name = re.sub(r"^model\.language_model\.", "language_model.model.", key)
        name = re.sub(r"^lm_head\.", "language_model.lm_head.", name)
        saved[re.sub(r"^model\.", "", name)] = tuple(tensor.shape)
    if config.tie_word_embeddings:
        saved.pop("language_model.lm_head.weight", None)
    return saved


def check_tensors(shards: list[Path], config: Any, backbone: Backbone) -> int:
    """Convert every tensor's name and shape (no data read) and compare with the native model.

    Returns:
        The number of native tensors.

    Raises:
        ConvertError: A tensor is missing, unexpected, or of the wrong shape; names the weight file.
    """
    import torch

    where: dict[str, Path] = {}
    meta: dict[str, Any] = {}
    for shard in shards:
        for key, (shape, _) in shard_keys(shard).items():
            where[key] = shard
            meta[key] = torch.empty(shape, device="meta")
    # Errors about the set of tensors name the file that lists them.
    first = shards[0] if len(shards) == 1 else shards[0].parent / "model.safetensors.index.json"
    try:
        converted = {k: tuple(v.shape) for k, v in convert_tensors(meta, config, backbone).items()}
    except KeyError as exc:
        key = exc.args[0]
        raise ConvertError(where.get(key, first), f"tensor {key!r} belongs to no part of InternVL2") from None
    except RuntimeError as exc:
        raise ConvertError(first, f"a fused projection does not fit the config ({exc})") from None
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ConvertError(first, f"{len(missing)} tensors missing for {backbone.name}, e.g. {missing[:3]}")
    unexpected = sorted(set(converted) - set(expected))
    if unexpected:
        raise ConvertError(
            first, f"{len(unexpected)} tensors unknown to the native model, e.g. {unexpected[:3]}"
        )
    wrong = [(k, converted[k], expected[k]) for k in sorted(expected) if converted[k] != expected[k]]
    if wrong:
        key, got, want = wrong[0]
        raise ConvertError(first, f"{len(wrong)} tensors of the wrong shape, e.g. {key} {got} != {want}")
    return len(expected)


def write_weights(shards: list[Path], config: Any, backbone: Backbone, out: Path) -> None:
    """Convert shard by shard (one shard in memory at a time), keeping the source's dtype and sharding."""
    from safetensors.torch import load_file, save_file

    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        converted = {
            k: v.contiguous() for k, v in convert_tensors(load_file(shard), config, backbone).items()
        }
        save_file(converted, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, name))
    if len(shards) > 1:
        write_json_atomic(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def copy_tokenizer(tokenizer_dir: Path, out: Path, template: str) -> None:
    """Copy the tokenizer files, add InternVL's image tokens by name, drop remote code, set the template."""
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file() and not NOT_COPIED.match(path.name) and path.name != PROVENANCE:
            shutil.copy2(path, out / path.name)
    config_path = out / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    config.pop("auto_map", None)
    extra = config.get("extra_special_tokens") or {}
    if isinstance(extra, list):
        config.update(IMAGE_SPECIAL_TOKENS)  # transformers 5 writes named extra tokens as top-level keys
    else:
        config["extra_special_tokens"] = {**extra, **IMAGE_SPECIAL_TOKENS}
    config["chat_template"] = template
    write_json_atomic(config_path, config)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # superseded by the template just set


def load_native_tokenizer(staging: Path, source: Path) -> Any:
    """The copied tokenizer, loaded without remote code.

    Raises:
        ConvertError: The tokenizer is remote code only (InternLM2's ``InternLM2Tokenizer``) or broken.
    """
    from transformers import AutoTokenizer

    tokenizer_class = read_json(staging / "tokenizer_config.json").get("tokenizer_class")
    try:
        return AutoTokenizer.from_pretrained(staging)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError, OSError or ImportError here
        raise ConvertError(
            source / "tokenizer_config.json",
            f"tokenizer class {tokenizer_class!r} does not load without trust_remote_code "
            f"({type(exc).__name__}); pass --tokenizer DIR with a native tokenizer of the same "
            "vocabulary (e.g. that of an InternVL '-hf' release with the same language model)",
        ) from None


def write_processor(
    staging: Path, source: Path, original: dict[str, Any], config: Any, fmt: ChatFormat
) -> None:
    """Tokenizer, image processor and processor configs, and the generation config, into ``staging``."""
    from transformers import GenerationConfig, GotOcr2ImageProcessorPil

    from occ_core.train.processor import InternVLImageProcessor

    tokenizer = load_native_tokenizer(staging, source)
    side = config.vision_config.image_size[0]
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": side, "width": side},
        crop_to_patches=bool(original.get("dynamic_image_size", False)),
        min_patches=int(original.get("min_dynamic_patch", 1)),
        max_patches=int(original.get("max_dynamic_patch", 12)),
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    processor = InternVLImageProcessor(
        image_processor,
        tokenizer,
        image_seq_length=config.image_seq_length,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(staging)
    stop = tokenizer.convert_tokens_to_ids(fmt.sep)
    GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id or stop).save_pretrained(staging)


@dataclass(frozen=True)
class ConversionReport:
    """What one conversion did."""

    src: str
    out: str
    backbone: str
    text_model_type: str
    template: str
    tensors: int


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh sibling directory of ``out`` that is renamed onto it on success, deleted on error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_checkpoint(src: Path, out: Path, tokenizer_dir: Path | None = None) -> ConversionReport:
    """Convert the InternVL2 checkpoint ``src`` into a native InternVL directory ``out``.

    Everything is checked (config, every tensor's name and shape, the tokenizer's image token) before
    the weights are read; ``out`` appears only once complete.

    Args:
        src: An original ``InternVLChatModel`` directory (config.json, safetensors, tokenizer files).
        out: The directory to create; it must not exist, or be empty.
        tokenizer_dir: Take the tokenizer files from here instead of ``src`` (for a remote-code-only
            tokenizer such as InternLM2's); its image token must have the same id.

    Raises:
        ConvertError: ``src`` (or ``tokenizer_dir``) is not convertible; names the file and the reason.
        FileExistsError: ``out`` exists and is not empty.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConvertError(src, "not a directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty")
    original = read_original_config(src)
    backbone = backbone_of(original, src / "config.json")
    image_token_id = token_id(src, IMAGE_CONTEXT_TOKEN)
    if (
        tokenizer_dir is not None
        and (other := token_id(Path(tokenizer_dir), IMAGE_CONTEXT_TOKEN)) != image_token_id
    ):
        raise ConvertError(
            Path(tokenizer_dir), f"{IMAGE_CONTEXT_TOKEN} has id {other} here but {image_token_id} in {src}"
        )
    try:
        config = internvl_config(original, backbone, image_token_id)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConvertError(src / "config.json", f"cannot map to a native config ({exc})") from None
    shards = weight_shards(src)
    tensors = check_tensors(shards, config, backbone)
    fmt = CHAT_FORMATS[original["template"]]
    if out.exists():
        out.rmdir()  # empty: replaced atomically by the staging directory
    with staging_dir(out) as staging:
        copy_tokenizer(Path(tokenizer_dir or src), staging, chat_template(fmt))
        write_processor(staging, tokenizer_dir or src, original, config, fmt)
        config.save_pretrained(staging)
        write_weights(shards, config, backbone, staging)
        report = ConversionReport(
            src=str(src),
            out=str(out),
            backbone=backbone.name,
            text_model_type=backbone.model_type,
            template=original["template"],
            tensors=tensors,
        )
        write_json_atomic(staging / PROVENANCE, dataclasses.asdict(report))
    return report


@click.group()
def cli() -> None:
    """Models: convert the seed's released InternVL2 checkpoints to the native format."""


@cli.command()
@click.option(
    "--src",
    type=click.Path(path_type=Path),
    required=True,
    help="original InternVL2 checkpoint directory (InternVLChatModel, remote code)",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="native directory to create")
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="take the tokenizer from this directory (needed when the source tokenizer is remote code only)",
)
def convert(src: Path, out: Path, tokenizer_dir: Path | None) -> None:
    """Convert --src into transformers' InternVLForConditionalGeneration format at --out."""
    try:
        report = convert_checkpoint(src, out, tokenizer_dir)
    except ConvertError as exc:
        hint = (
            "--tokenizer"
            if tokenizer_dir is not None and exc.path.startswith(str(tokenizer_dir))
            else "--src"
        )
        raise click.BadParameter(str(exc), param_hint=hint) from None
    except FileExistsError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    click.echo(json.dumps(dataclasses.asdict(report)))


if __name__ == "__main__":
    cli()
