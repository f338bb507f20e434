"""The benchmark's data, processor and models: ours, transformers' LLaVA holding the very same Parameters, ours-ps2.

Notable:
- ours: QwenSiglipForConditionalGeneration(config), 196 image tokens per image.
- llava: transformers' LlavaForConditionalGeneration from `export_llava.to_llava(ours)`, then given the very same
  Parameter objects (to_llava shares storage only), so one optimizer serves both and the weights never drift apart.
  Logits are checked equal before anything is timed.
- ours-ps2: ours with pixel_shuffle_factor=2 (49 image tokens); the same tower and LM tensors, its own projector.
- Random init: seeded N(0, initializer_range) matrices, zero biases, unit norms (faster than transformers' init).
- Data: LLaVA-format records on JPEGs written here (640x480, COCO-like), read by the real data module and collator.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import SiglipImageProcessorPil
from transformers.initialization import no_init_weights

from configuration_qwen_siglip import QwenSiglipConfig
from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
from processing_qwen_siglip import QwenSiglipProcessor
from qwen_siglip.llava import to_llava

OURS, LLAVA, OURS_PS2 = "ours", "llava", "ours-ps2"
QUESTION = "Describe this image."
WORDS = (
    "red green blue yellow grey small large round square circle triangle left right top bottom middle near far "
    "shape object picture photo sofa table cat dog street sky light dark bright two three several under over"
).split()
ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def make_data(folder: Path, n: int, text_tokens: int, seed: int) -> tuple[Path, list[str]]:
    """`n` LLaVA-format caption records with 640x480 JPEGs; returns (json path, every text for the tokenizer)."""
    import random

    rng = random.Random(seed)
    n_words = max(4, text_tokens - 14)  # the chat template's own tokens (roles, markers, question) are about 14
    records = []
    for i in range(n):
        image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(560), rng.randrange(400)
            fill = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse((x, y, x + rng.randrange(20, 80), y + rng.randrange(20, 80)), fill=fill)
        image.save(folder / f"{i:05d}.jpg", quality=90)
        caption = " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."
        turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": caption}]
        records.append({"image": f"{i:05d}.jpg", "conversations": turns})
    path = folder / "chat.json"
    path.write_text(json.dumps(records))
    return path, [QUESTION, "user assistant", *WORDS, *(r["conversations"][1]["value"] for r in records)]


def build_processor(tokenizer, num_image_tokens: int) -> QwenSiglipProcessor:
    image_processor = SiglipImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return QwenSiglipProcessor(image_processor, tokenizer, num_image_tokens=num_image_tokens)


def random_init(model: torch.nn.Module, seed: int, std: float) -> None:
    """Seeded N(0, std) matrices, zero biases, unit norm weights (transformers' own init is slower)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std, generator=g)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def share_parameters(dst: torch.nn.Module, src: torch.nn.Module) -> list[str]:
    """Make dst's parameters and buffers the very objects of src's where name and shape match; return the rest."""
    src_params = dict(src.named_parameters(remove_duplicate=False))
    src_buffers = dict(src.named_buffers())
    unmatched = []
    for name, p in list(dst.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        if name in src_params and src_params[name].shape == p.shape:
            setattr(dst.get_submodule(owner), leaf, src_params[name])
        elif ".post_layernorm." not in name:  # LLaVA builds SigLIP's final LayerNorm but reads features before it
            unmatched.append(name)
    for name, b in list(dst.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if name in src_buffers and src_buffers[name].shape == b.shape:
            dst.get_submodule(owner)._buffers[leaf] = src_buffers[name]
    return unmatched


def build_models(config: QwenSiglipConfig, args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """ours (random, seeded), llava (same Parameter objects), ours-ps2 (same tower and LM, its own projector)."""
    with no_init_weights():
        ours = QwenSiglipForConditionalGeneration(config)
    random_init(ours, args.seed, config.text_config.initializer_range)
    ours.tie_weights()
    ours.to(device=args.device, dtype=args.dtype)

    llava = to_llava(ours)
    share_parameters(llava, ours)  # to_llava shares storage; one optimizer needs the same Parameter objects too

    ps2_config = QwenSiglipConfig.from_dict({**config.to_dict(), "pixel_shuffle_factor": 2})
    with torch.device("meta"):
        ps2 = QwenSiglipForConditionalGeneration(ps2_config)
    for name in share_parameters(ps2, ours):  # only the projector's first layer (4x wider input) is its own
        owner, _, leaf = name.rpartition(".")
        shape = ps2.get_parameter(name).shape
        # On the CPU first: random_init's seeded generator is a CPU one.
        setattr(ps2.get_submodule(owner), leaf, torch.nn.Parameter(torch.empty(shape)))
    random_init(ps2.model.multi_modal_projector.linear_1, args.seed + 1, config.text_config.initializer_range)
    ps2.to(device=args.device, dtype=args.dtype)  # moves only the new projector layer: the rest is there already
    meta = [n for n, t in [*ps2.named_parameters(), *ps2.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"ours-ps2 kept meta tensors: {meta}")
    return {OURS: ours, LLAVA: llava, OURS_PS2: ps2}


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    # Non-tensors (the padding-free collator's use_cache=False) stay behind: the step passes use_cache itself.
    return {
        k: v.to(device, dtype=dtype if v.is_floating_point() else None)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }


def check_same_logits(a: torch.nn.Module, b: torch.nn.Module, batch: dict, dtype: torch.dtype) -> float:
    """Max |logits difference| of ours vs LLaVA on one sample; refuses to benchmark unequal models."""
    inputs = {k: v[:1] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    inputs["pixel_values"] = batch["pixel_values"][:1]
    with torch.no_grad():
        diff = (a.eval()(**inputs).logits.float() - b.eval()(**inputs).logits.float()).abs().max().item()
    if diff > ATOL[dtype]:
        raise RuntimeError(f"ours and LLaVA disagree (max |logits diff| {diff:.3g}): the comparison would be unfair")
    return diff
