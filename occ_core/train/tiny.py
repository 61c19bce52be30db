"""The ``tiny`` preset: an InternVL built from a config, small enough to fine-tune on a 2-core CPU.

Same architecture and processor as the real presets (``InternVLForConditionalGeneration``: vision
tower, pixel-shuffle MLP projector, Qwen2 language model), so every code path the 1B-8B models take
runs here too. Three parts are occ's own:

- the vision tower, pre-trained by occ on object-only images of the 8 classes and shipped in
  ``occ_core/train/assets/tiny-vision`` (see ``occ_core.train.vision``); without it the tower is random;
- a byte-level BPE tokenizer trained on the method's questions and answers (a few hundred tokens);
- a ChatML template whose assistant turns carry ``{% generation %}`` markers, so trl's
  ``assistant_only_loss`` trains every assistant turn and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    InternVLVisionModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from occ_core.classes import QA_CLASSES, answer_for
from occ_core.cot import NO, YES, Prompts
from occ_core.train.processor import InternVLImageProcessor

VISION_ASSET = Path(__file__).parent / "assets" / "tiny-vision"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
# Renders string or structured content; an image block becomes the processor's <IMG_CONTEXT> marker,
# which the processor expands to <img> + image_seq_length context tokens + </img>.
CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for block in content %}"
    "{% if block['type'] == 'image' %}<IMG_CONTEXT>"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}<|im_end|>{% endgeneration %}\n"
    "{% else %}{{ render(message['content']) }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Language model and projector shape: the tower decides the image; text is a handful of fixed phrases.
TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
DOWNSAMPLE_RATIO = 0.5


def qa_corpus(prompts: Prompts | None = None) -> list[str]:
    """Every string the method asks or answers: the tokenizer's training text."""
    prompts = prompts or Prompts()
    texts = [prompts.q1, prompts.q6, prompts.q0, prompts.cot_answer, prompts.recheck, YES, NO]
    texts += [answer_for(name) for name in QA_CLASSES]
    return texts + ["user", "assistant", "system", "\n"]


def build_tokenizer(prompts: Prompts | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the QA corpus with ChatML and InternVL's image tokens (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(qa_corpus(prompts) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # InternVLProcessor reads these attributes by name.
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        chat_template=CHAT_TEMPLATE,
    )


def _side(size: int | list[int] | tuple[int, ...]) -> int:
    return size[0] if isinstance(size, (list, tuple)) else size


def image_seq_length(vision: InternVLVisionConfig) -> int:
    """Image tokens per tile after pixel shuffle: (side / patch)^2 * ratio^2."""
    return int((_side(vision.image_size) // _side(vision.patch_size)) ** 2 * DOWNSAMPLE_RATIO**2)


def build_processor(
    tokenizer: PreTrainedTokenizerFast, vision: InternVLVisionConfig
) -> InternVLImageProcessor:
    """The image-only InternVL processor at the tower's resolution, ImageNet mean and std."""
    side = _side(vision.image_size)
    image_processor = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=False)
    return InternVLImageProcessor(
        image_processor, tokenizer, image_seq_length=image_seq_length(vision), chat_template=CHAT_TEMPLATE
    )


def internvl_config(
    tokenizer: Any, vision: InternVLVisionConfig, text_kwargs: dict[str, Any], **extra: Any
) -> InternVLConfig:
    """An InternVL config of a vision config, Qwen2 text kwargs and occ's tokenizer's special tokens.

    ``text_kwargs`` may set ``vocab_size`` (default: the tokenizer's); ``extra`` goes to InternVLConfig.
    """
    text = Qwen2Config(
        **{"vocab_size": len(tokenizer), **text_kwargs},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=image_seq_length(vision),
        downsample_ratio=DOWNSAMPLE_RATIO,
        **extra,
    )


def build_tiny(
    vision_dir: Path | None = VISION_ASSET, seed: int = 0
) -> tuple[InternVLForConditionalGeneration, InternVLImageProcessor]:
    """The tiny InternVL and its processor; the tower's weights come from ``vision_dir`` when it exists.

    Args:
        vision_dir: A saved ``InternVLVisionModel`` (the shipped pre-trained tower); None or a missing
            directory gives a random tower of the default shape.
        seed: Seed of the language model and projector initialisation.
    """
    import torch

    from occ_core.train.vision import TINY_VISION_CONFIG

    tower = None
    if vision_dir is not None and (Path(vision_dir) / "config.json").is_file():
        tower = InternVLVisionModel.from_pretrained(vision_dir, dtype=torch.float32)
        vision = tower.config
    else:
        vision = InternVLVisionConfig(**TINY_VISION_CONFIG)
    tokenizer = build_tokenizer()
    config = internvl_config(tokenizer, vision, TEXT_CONFIG)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    if tower is not None:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, build_processor(tokenizer, vision)
