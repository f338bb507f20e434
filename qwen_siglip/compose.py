"""Compose a fresh QwenSiglip model and processor from two pretrained bases: what stage 1 starts from.

Notable:
- Every base weight is loaded strictly: a missing or mis-shaped tensor raises, naming the base. Only the projector
  starts from random init.
- SigLIP's pooling head and post-layernorm (and, for a full SigLIP checkpoint, its text half) are dropped on
  purpose: the VLM never uses them, and unused parameters break DDP.
- The image token is Qwen's `<|image_pad|>`, looked up in the base's tokenizer (its id differs in tokenizers
  trained elsewhere); the generation config suppresses it, since a generated one has no image behind it.
- Loading a trained checkpoint needs none of this: `from_pretrained` on the Hub classes does it.
"""

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    SiglipImageProcessorPil,
)
from transformers.utils import logging

from configuration_qwen_siglip import QwenSiglipConfig
from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
from processing_qwen_siglip import IMAGE_TOKEN, QwenSiglipProcessor

logger = logging.get_logger(__name__)


def compose_model(
    vision: str, text: str, dtype: torch.dtype | str | None = None, **config_kwargs
) -> QwenSiglipForConditionalGeneration:
    """A fresh model from a SigLIP checkpoint and a Qwen2 causal LM checkpoint (Hub ids or folders)."""
    tower = _load_vision_base(vision, dtype)
    lm, lm_info = AutoModelForCausalLM.from_pretrained(text, dtype=dtype, output_loading_info=True)
    _raise_on_bad_load(text, lm_info)
    if "image_token_id" not in config_kwargs:  # Qwen's <|image_pad|>, wherever this tokenizer has it
        config_kwargs["image_token_id"] = AutoTokenizer.from_pretrained(text).convert_tokens_to_ids(IMAGE_TOKEN)
    config = QwenSiglipConfig(vision_config=tower.config, text_config=lm.config, **config_kwargs)
    model = QwenSiglipForConditionalGeneration(config).to(lm.dtype)
    # strict, less the post-layernorm our tower does not have (QwenSiglipModel says why)
    tower_weights = {k: v for k, v in tower.state_dict().items() if not k.startswith("post_layernorm.")}
    model.model.vision_tower.load_state_dict(tower_weights, strict=True)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:  # a tied head already shares the embedding matrix just loaded
        model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    # Only <|image_pad|> is suppressed: fed back, it is a placeholder with no image behind it (the one token the
    # merge treats specially). The vision start/end tokens are plain tokens to the model; never trained as targets,
    # they are unlikely, and harmless if produced (skip_special_tokens drops them from the text).
    model.generation_config.update(**_generation_defaults(lm), suppress_tokens=[config.image_token_id])
    model.config.name_or_path = ""
    return model


def compose_processor(vision: str, text: str, num_image_tokens: int) -> QwenSiglipProcessor:
    """The processor of a fresh model: SigLIP's image processor + the LM's tokenizer + our chat template.

    `num_image_tokens` must equal the model config's `num_image_tokens`.
    """
    # The PIL backend needs no torchvision; SigLIP's own preprocessor_config.json gives size and normalisation.
    image_processor = SiglipImageProcessorPil.from_pretrained(vision)
    return QwenSiglipProcessor(image_processor, AutoTokenizer.from_pretrained(text), num_image_tokens=num_image_tokens)


def compose(
    vision: str, text: str, dtype=None, **config_kwargs
) -> tuple[QwenSiglipForConditionalGeneration, QwenSiglipProcessor]:
    """(model, processor) composed from the two bases."""
    model = compose_model(vision, text, dtype=dtype, **config_kwargs)
    return model, compose_processor(vision, text, model.config.num_image_tokens)


def _load_vision_base(path: str, dtype) -> nn.Module:
    """Load SigLIP's vision tower alone, from a full SiglipModel checkpoint or a vision-only one."""
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "vision_config"):  # full SigLIP (vision + text): keep the vision half
        config = config.vision_config
    config.vision_use_head = False
    # transformers would print every dropped key as UNEXPECTED; they are dropped on purpose, so say it once instead.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tower, info = AutoModel.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    _raise_on_bad_load(path, info)
    if info.get("unexpected_keys"):
        logger.info(f"{path}: dropped {len(info['unexpected_keys'])} tensors the VLM never uses (text half, head)")
    return tower


def _raise_on_bad_load(path: str, info: dict) -> None:
    """Unexpected keys are fine (SigLIP's text half and head); missing or mis-shaped ones are not."""
    problems = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise ValueError(f"Base checkpoint {path!r} does not fit the architecture: {problems}")


def _generation_defaults(lm: PreTrainedModel) -> dict:
    """Carry the LM's end-of-turn and padding tokens over, so generation stops where the LM would."""
    g = lm.generation_config
    return {k: getattr(g, k) for k in ("eos_token_id", "pad_token_id", "bos_token_id") if getattr(g, k) is not None}
