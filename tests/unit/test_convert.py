"""``occ model convert``: an original InternVL2 checkpoint becomes a native one with the same logits.

    .venv/bin/python -m pytest tests/unit/test_convert.py -q

Each test writes a tiny checkpoint in the original remote-code layout (``InternVLChatModel`` config,
original tensor names, random weights). The reference forward runs the ORIGINAL tensors through an
independent plain-torch implementation of InternVL2: InternViT (fused ``attn.qkv``, ``ls1/ls2`` layer
scale), pixel shuffle v2 at 0.5, ``mlp1``, the image embeddings put at the ``<IMG_CONTEXT>`` positions,
and the language model. The language model of the reference is transformers' ``Qwen2ForCausalLM`` /
``Phi3ForCausalLM`` for Qwen2 / Phi-3 (the original remote code uses exactly these layouts and key
names), and a plain-torch InternLM2 working on the fused ``wqkv`` for InternLM2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file

from occ_core.cli import main
from occ_core.convert import DEFAULT_SYSTEM

VISION = {"hidden_size": 32, "num_heads": 4, "layers": 2, "intermediate": 64, "image": 56, "patch": 14}
TEXT = {"hidden_size": 32, "heads": 4, "kv_heads": 2, "layers": 2, "intermediate": 48}
EPS_VISION, EPS_TEXT, ROPE_THETA = 1e-6, 1e-6, 10000.0
TEMPLATES = {"qwen2": "Hermes-2", "internlm2": "internlm2-chat", "phi3": "phi3-chat"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from occ_core.train.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]}
    )
    tokenizer.save_pretrained(path)
    return path


def _rand(shape: tuple[int, ...], gen: torch.Generator, around: float = 0.0) -> torch.Tensor:
    return around + 0.2 * torch.randn(shape, generator=gen)


def vision_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """InternViT-300M-style tensors under the original names, and the mlp1 projector."""
    c, i, p = VISION["hidden_size"], VISION["intermediate"], VISION["patch"]
    n = (VISION["image"] // p) ** 2 + 1
    t = {
        "vision_model.embeddings.class_embedding": _rand((1, 1, c), gen),
        "vision_model.embeddings.patch_embedding.weight": _rand((c, 3, p, p), gen) / 10,
        "vision_model.embeddings.patch_embedding.bias": _rand((c,), gen),
        "vision_model.embeddings.position_embedding": _rand((1, n, c), gen),
    }
    shapes = {
        "attn.qkv.weight": (3 * c, c),
        "attn.qkv.bias": (3 * c,),
        "attn.proj.weight": (c, c),
        "attn.proj.bias": (c,),
        "mlp.fc1.weight": (i, c),
        "mlp.fc1.bias": (i,),
        "mlp.fc2.weight": (c, i),
        "mlp.fc2.bias": (c,),
        "norm1.bias": (c,),
        "norm2.bias": (c,),
    }
    for layer in range(VISION["layers"]):
        prefix = f"vision_model.encoder.layers.{layer}."
        t.update({prefix + k: _rand(s, gen) for k, s in shapes.items()})
        t.update(
            {prefix + k: _rand((c,), gen, around=1.0) for k in ("norm1.weight", "norm2.weight", "ls1", "ls2")}
        )
    h = TEXT["hidden_size"]
    t.update(
        {
            "mlp1.0.weight": _rand((4 * c,), gen, around=1.0),
            "mlp1.0.bias": _rand((4 * c,), gen),
            "mlp1.1.weight": _rand((h, 4 * c), gen),
            "mlp1.1.bias": _rand((h,), gen),
            "mlp1.3.weight": _rand((h, h), gen),
            "mlp1.3.bias": _rand((h,), gen),
        }
    )
    return t


def llm_config(backbone: str, vocab: int) -> dict:
    """The original ``llm_config``, with the generic keys old transformers wrote into every config."""
    common = {
        "hidden_size": TEXT["hidden_size"],
        "num_attention_heads": TEXT["heads"],
        "num_key_value_heads": TEXT["kv_heads"],
        "num_hidden_layers": TEXT["layers"],
        "intermediate_size": TEXT["intermediate"],
        "vocab_size": vocab,
        "rms_norm_eps": EPS_TEXT,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "bad_words_ids": None,
        "num_beams": 1,
        "attn_implementation": "flash_attention_2",
        "_name_or_path": "/mnt/llm",
    }
    if backbone == "qwen2":
        return {
            **common,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "use_sliding_window": False,
        }
    if backbone == "phi3":
        return {
            **common,
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "original_max_position_embeddings": 128,
            "sliding_window": None,
        }
    return {
        **common,
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False,
    }


def native_llm(backbone: str, llm: dict):
    """transformers' own Qwen2 / Phi-3 causal LM of an original llm_config (the reference's LLM half)."""
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
    }[backbone]
    keys = {"hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"}
    keys |= {
        "intermediate_size",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "pad_token_id",
    }
    config = config_class(
        **{k: llm[k] for k in keys}, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}
    )
    return model_class(config)


def llm_tensors(backbone: str, llm: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The language model's tensors under the original names (``language_model.`` + its own names)."""
    if backbone != "internlm2":
        names = native_llm(backbone, llm).state_dict()
    else:
        h, i, hd = TEXT["hidden_size"], TEXT["intermediate"], TEXT["hidden_size"] // TEXT["heads"]
        qkv_rows = (TEXT["heads"] + 2 * TEXT["kv_heads"]) * hd
        names = {"model.tok_embeddings.weight": torch.empty(llm["vocab_size"], h)}
        for layer in range(TEXT["layers"]):
            p = f"model.layers.{layer}."
            names.update(
                {
                    p + "attention.wqkv.weight": torch.empty(qkv_rows, h),
                    p + "attention.wo.weight": torch.empty(h, h),
                    p + "feed_forward.w1.weight": torch.empty(i, h),
                    p + "feed_forward.w3.weight": torch.empty(i, h),
                    p + "feed_forward.w2.weight": torch.empty(h, i),
                    p + "attention_norm.weight": torch.empty(h),
                    p + "ffn_norm.weight": torch.empty(h),
                }
            )
        names.update(
            {"model.norm.weight": torch.empty(h), "output.weight": torch.empty(llm["vocab_size"], h)}
        )
    return {
        f"language_model.{k}": _rand(tuple(v.shape), gen, around=1.0 if "norm" in k else 0.0)
        for k, v in names.items()
    }


def write_original(root: Path, backbone: str, tokenizer_dir: Path) -> Path:
    """A tiny InternVL2 checkpoint in the original remote-code layout."""
    src = root / f"InternVL2-{backbone}"
    shutil.copytree(tokenizer_dir, src)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 16
    llm = llm_config(backbone, vocab)
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": VISION["image"],
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": TEMPLATES[backbone],
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": VISION["hidden_size"],
            "num_attention_heads": VISION["num_heads"],
            "num_hidden_layers": VISION["layers"],
            "intermediate_size": VISION["intermediate"],
            "image_size": VISION["image"],
            "patch_size": VISION["patch"],
            "num_channels": 3,
            "hidden_act": "gelu",
            "layer_norm_eps": EPS_VISION,
            "norm_type": "layer_norm",
            "qkv_bias": True,
            "qk_normalization": False,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "drop_path_rate": 0.1,
            "use_flash_attn": True,
        },
        "llm_config": llm,
    }
    (src / "config.json").write_text(json.dumps(config))
    (src / "modeling_internvl_chat.py").write_text("raise RuntimeError('remote code must not run')\n")
    gen = torch.Generator().manual_seed(0)
    save_file({**vision_tensors(gen), **llm_tensors(backbone, llm, gen)}, src / "model.safetensors")
    return src


# --- the reference: the original InternVL2 forward, from the original tensors --------------------------


def internvit(t: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    c, heads = VISION["hidden_size"], VISION["num_heads"]
    x = F.conv2d(pixels, t["vision_model.embeddings.patch_embedding.weight"], stride=VISION["patch"])
    x = x + t["vision_model.embeddings.patch_embedding.bias"][:, None, None]
    x = x.flatten(2).transpose(1, 2)
    b = x.shape[0]
    x = torch.cat([t["vision_model.embeddings.class_embedding"].expand(b, -1, -1), x], dim=1)
    x = x + t["vision_model.embeddings.position_embedding"]
    n = x.shape[1]
    for layer in range(VISION["layers"]):
        w = {k.split(f"layers.{layer}.", 1)[1]: v for k, v in t.items() if f"encoder.layers.{layer}." in k}
        y = F.layer_norm(x, (c,), w["norm1.weight"], w["norm1.bias"], EPS_VISION)
        qkv = F.linear(y, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(b, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(b, n, c), w["attn.proj.weight"], w["attn.proj.bias"])
        x = x + w["ls1"] * att
        y = F.layer_norm(x, (c,), w["norm2.weight"], w["norm2.bias"], EPS_VISION)
        y = F.linear(
            F.gelu(F.linear(y, w["mlp.fc1.weight"], w["mlp.fc1.bias"])),
            w["mlp.fc2.weight"],
            w["mlp.fc2.bias"],
        )
        x = x + w["ls2"] * y
    return x


def pixel_shuffle_v2(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale))).permute(0, 2, 1, 3)
    return x


def image_embeddings(t: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    vit = internvit(t, pixels)[:, 1:]
    b, n, c = vit.shape
    side = int(n**0.5)
    vit = pixel_shuffle_v2(vit.reshape(b, side, side, c)).reshape(b, -1, 4 * c)
    y = F.layer_norm(vit, (4 * c,), t["mlp1.0.weight"], t["mlp1.0.bias"])
    y = F.gelu(F.linear(y, t["mlp1.1.weight"], t["mlp1.1.bias"]))
    return F.linear(y, t["mlp1.3.weight"], t["mlp1.3.bias"])


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS_TEXT))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def internlm2(t: dict[str, torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward on its fused ``wqkv`` (as in its remote modeling code), eager attention."""
    b, s, h = embeds.shape
    heads, kv = TEXT["heads"], TEXT["kv_heads"]
    hd, groups = h // heads, heads // kv
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(s).float(), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.full((s, s), float("-inf")).triu(1)
    x = embeds
    for layer in range(TEXT["layers"]):
        p = f"language_model.model.layers.{layer}."
        qkv = F.linear(rms(x, t[p + "attention_norm.weight"]), t[p + "attention.wqkv.weight"])
        qkv = qkv.reshape(b, s, kv, groups + 2, hd)
        q = qkv[..., :groups, :].reshape(b, s, heads, hd).transpose(1, 2)
        k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + causal, dim=-1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(b, s, h), t[p + "attention.wo.weight"])
        y = rms(x, t[p + "ffn_norm.weight"])
        y = F.silu(F.linear(y, t[p + "feed_forward.w1.weight"])) * F.linear(
            y, t[p + "feed_forward.w3.weight"]
        )
        x = x + F.linear(y, t[p + "feed_forward.w2.weight"])
    return F.linear(rms(x, t["language_model.model.norm.weight"]), t["language_model.output.weight"])


def reference_logits(src: Path, backbone: str, input_ids: torch.Tensor, pixels: torch.Tensor, image_id: int):
    from safetensors.torch import load_file

    t = load_file(src / "model.safetensors")
    llm = json.loads((src / "config.json").read_text())["llm_config"]
    embed_key = "model.tok_embeddings.weight" if backbone == "internlm2" else "model.embed_tokens.weight"
    embeds = F.embedding(input_ids, t[f"language_model.{embed_key}"])
    embeds[input_ids == image_id] = image_embeddings(t, pixels).reshape(-1, TEXT["hidden_size"])
    if backbone == "internlm2":
        return internlm2(t, embeds)
    model = native_llm(backbone, llm)
    model.load_state_dict(
        {k.removeprefix("language_model."): v for k, v in t.items() if k.startswith("language_")}
    )
    return model.eval()(inputs_embeds=embeds).logits


def run_convert(*args: str):
    return CliRunner().invoke(main, ["model", "convert", *args])


@pytest.mark.parametrize("backbone", ["qwen2", "internlm2", "phi3"])
def test_converted_logits_match_the_original_forward(
    tmp_path: Path, tokenizer_dir: Path, backbone: str
) -> None:
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    src = write_original(tmp_path, backbone, tokenizer_dir)
    out = tmp_path / "native"
    result = run_convert("--src", str(src), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.output)["backbone"]
        == {"qwen2": "Qwen2", "internlm2": "InternLM2", "phi3": "Phi-3"}[backbone]
    )

    model, info = InternVLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    image_id = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.config.image_token_id == image_id and model.config.image_seq_length == 4
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(10, 200, (2, 9), generator=gen)
    input_ids = torch.cat([text[:, :3], torch.full((2, 4), image_id), text[:, 3:]], dim=1)
    pixels = torch.randn(2, 3, VISION["image"], VISION["image"], generator=gen)

    with torch.no_grad():
        got = model.eval()(input_ids=input_ids, pixel_values=pixels).logits
        want = reference_logits(src, backbone, input_ids, pixels, image_id)
    assert got.shape == want.shape == (2, 13, model.config.text_config.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        (
            "qwen2",
            "<|im_start|>system\n{sys}<|im_end|><|im_start|>user\n<IMG_CONTEXT>\nQ?<|im_end|><|im_start|>assistant\n",
        ),
        ("phi3", "<|system|>\n{sys}<|end|><|user|>\n<IMG_CONTEXT>\nQ?<|end|><|assistant|>\n"),
    ],
)
def test_chat_template_renders_the_upstream_conversation(
    tmp_path: Path, tokenizer_dir: Path, backbone: str, expected: str
) -> None:
    from transformers import GenerationConfig

    from occ_core.train.processor import load_processor

    src = write_original(tmp_path, backbone, tokenizer_dir)
    out = tmp_path / "native"
    assert run_convert("--src", str(src), "--out", str(out)).exit_code == 0
    processor = load_processor(out, 4)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nQ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == expected.format(sys=DEFAULT_SYSTEM)
    sep = "<|im_end|>" if backbone == "qwen2" else "<|end|>"
    assert GenerationConfig.from_pretrained(out).eos_token_id == processor.tokenizer.convert_tokens_to_ids(
        sep
    )


def _no_config(src: Path) -> str:
    (src / "config.json").unlink()
    return "config.json: missing"


def _native_architecture(src: Path) -> str:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(
        json.dumps({**config, "architectures": ["InternVLForConditionalGeneration"]})
    )
    return "already native"


def _unsupported_llm(src: Path) -> str:
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["architectures"] = ["MistralForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    return "MistralForCausalLM"


def _missing_tensor(src: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(src / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.attn.qkv.weight"]
    save_file(tensors, src / "model.safetensors")
    return "model.safetensors: 3 tensors missing"


def _remote_tokenizer(src: Path) -> str:
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "InternLM2Tokenizer"})
    )
    # InternLM2 checkpoints ship a sentencepiece model with added_tokens.json, and no tokenizer.json.
    vocab = {t["content"]: t["id"] for t in json.loads((src / "tokenizer.json").read_text())["added_tokens"]}
    (src / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": vocab["<IMG_CONTEXT>"]}))
    (src / "tokenizer.json").unlink()
    return "'InternLM2Tokenizer' does not load without trust_remote_code"


@pytest.mark.parametrize(
    "damage", [_no_config, _native_architecture, _unsupported_llm, _missing_tensor, _remote_tokenizer]
)
def test_bad_source_is_a_usage_error_and_leaves_nothing(tmp_path: Path, tokenizer_dir: Path, damage) -> None:
    src = write_original(tmp_path, "qwen2", tokenizer_dir)
    expected = damage(src)
    out = tmp_path / "out" / "native"
    result = run_convert("--src", str(src), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert expected in result.output and "--src" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_remote_code_tokenizer_is_replaced_by_tokenizer_option(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = write_original(tmp_path, "internlm2", tokenizer_dir)
    _remote_tokenizer(src)
    out = tmp_path / "native"
    result = run_convert("--src", str(src), "--out", str(out), "--tokenizer", str(tokenizer_dir))
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_existing_output_is_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = write_original(tmp_path, "qwen2", tokenizer_dir)
    out = tmp_path / "native"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_convert("--src", str(src), "--out", str(out))
    assert result.exit_code == 2 and "--out" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
