"""Tiny SigLIP and Qwen2 base checkpoints, built in code and saved like the real Hub repos.

Notable:
- Nothing is downloaded: the vision base is a full `SiglipModel` (text half and pooling head included, as in
  google/siglip-base-patch16-224) with a PIL image processor; the text base is a `Qwen2ForCausalLM` with tied
  embeddings (as Qwen2.5-0.5B; `tie_word_embeddings=False` for an LM with its own head, as Qwen2.5-7B) and a
  byte-level BPE tokenizer trained here that carries Qwen's special tokens.
- Tests and the embedded quickstart then go through the same `compose` path as the real bases.
- `initializer_range` is Qwen's 0.02 by default, which suits Qwen's widths (896 and up); the quickstart's 128-wide
  bases use about 1/sqrt(width), the std that keeps a layer's outputs at its inputs' scale (the README's quickstart
  section compares the two, one command each).
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)
from transformers.utils import logging as hf_logging

from processing_qwen_siglip import IMAGE_TOKEN, VISION_END, VISION_START

# Qwen2.5's special tokens that the VLM relies on (their ids differ here; the code never hard-codes them).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_TOKEN]
DEFAULT_CORPUS = [
    "user assistant system Describe the image. What is in the picture? A photo of a cat on a red sofa.",
    "What colour is the shape? How many shapes are there? Where is it? left right top bottom middle",
    "请描述这张图片。图片里有什么？这个形状是什么颜色？红色 绿色 蓝色 黄色 圆形 正方形 三角形",
    "0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" ( ) - one two three circle square triangle",
]


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 512) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer trained on `texts`; any text still encodes (bytes are the fallback)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts or DEFAULT_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        eos_token="<|im_end|>",  # as in Qwen2.5-Instruct: a chat turn ends generation
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS[1:],
    )


def save_tiny_bases(
    out_dir: str | Path,
    texts: list[str] | None = None,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
) -> tuple[Path, Path]:
    """Save a tiny SigLIP base and a tiny Qwen2 base under `out_dir`; return (vision_dir, text_dir)."""
    out_dir = Path(out_dir)
    vision_dir, text_dir = out_dir / "siglip", out_dir / "qwen2"
    torch.manual_seed(seed)
    small = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden)
    save_siglip(vision_dir, small, image_size, patch_size)
    qwen = dict(small, num_key_value_heads=max(1, heads // 2), tie_word_embeddings=tie_word_embeddings,
                initializer_range=initializer_range)  # fmt: skip
    save_qwen2(text_dir, build_tokenizer(texts), **qwen)
    return vision_dir, text_dir


def save_siglip(folder: Path, small: dict, image_size: int, patch_size: int) -> None:
    """A full SigLIP (vision + text) with a PIL image processor, as google/siglip-base-patch16-224 is laid out."""
    siglip = SiglipConfig(
        vision_config=dict(**small, image_size=image_size, patch_size=patch_size),
        # SigLIP's text half is dropped by the builder; it only has to be a valid model (ids inside its vocab).
        text_config=dict(
            **small, vocab_size=64, max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2
        ),
    )
    # Pitfall (transformers 5.24): saving diffs the config against a default SiglipTextConfig, whose own default
    # bos/eos ids (49406/49407) fail its vocabulary check (32000) and log two warnings about a config we never made.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        SiglipModel(siglip).save_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)
    SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)


def save_qwen2(folder: Path, tokenizer: Qwen2Tokenizer, **config) -> None:
    """A Qwen2 causal LM with `tokenizer` and a generation config that stops at the end of a turn."""
    tokenizer.save_pretrained(folder)
    im_end, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    qwen = Qwen2Config(
        **config,  # initializer_range is the std of the LM's random weights (see above)
        # Padded like Qwen's 151936 > 151665, always with a spare row: the LLaVA export puts `<image>` there.
        vocab_size=(len(tokenizer) // 64 + 1) * 64,
        max_position_embeddings=1024,
        eos_token_id=im_end,
        pad_token_id=pad,
        bos_token_id=None,
    )
    Qwen2ForCausalLM(qwen).save_pretrained(folder)
    GenerationConfig(eos_token_id=[im_end, pad], pad_token_id=pad).save_pretrained(folder)
