"""InternVL's processor without a video processor, for machines without torchvision.

transformers' ``InternVLProcessor`` insists on a video processor, which needs torchvision; the CPU
torch wheel has no working torchvision (docs: env-feasibility 2a). Images go through the PIL image
processor (``GotOcr2ImageProcessorPil``) either way. Where torchvision works (the GPU image), the stock
processor is used instead (``load_processor``).
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor, ProcessorMixin


class InternVLImageProcessor(InternVLProcessor):
    """``InternVLProcessor`` for images only: same prompts, same pixel values, no video processor."""

    # One 448 px tile per 256 px ObMan frame either way (method-spec 2.1); no tiling keeps it exact.
    images_kwargs = {"crop_to_patches": False}

    def __init__(
        self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kw
    ):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
        self.image_seq_length = image_seq_length
        self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token, self.image_token_id = (
            tokenizer.context_image_token,
            tokenizer.context_image_token_id,
        )
        self.video_token = tokenizer.video_token
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


def load_processor(model_dir: Path, image_seq_length: int) -> ProcessorMixin:
    """The processor of a checkpoint directory: stock InternVL where it loads, else the image-only one."""
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        if isinstance(processor, ProcessorMixin) and hasattr(processor, "image_seq_length"):
            return processor
    except Exception:  # noqa: BLE001 - no torchvision (CPU wheel), or our own processor class
        pass
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    return InternVLImageProcessor(
        image_processor, tokenizer, image_seq_length=image_seq_length, chat_template=tokenizer.chat_template
    )
