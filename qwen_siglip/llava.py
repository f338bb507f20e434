"""A QwenSiglip checkpoint as transformers' own LLaVA: a folder that loads with no remote code at all.

The command is `export_llava.py`; this module does the conversion.

Notable:
- The result is a `LlavaForConditionalGeneration` + `LlavaProcessor` folder, laid out like the llava-hf checkpoints
  (e.g. llava-interleave-qwen-0.5b-hf: SigLIP + Qwen2), so vLLM, SGLang, lmms-eval and anything else that speaks
  transformers' LLaVA can serve or evaluate it. No `.py` file and no `auto_map` is written.
- Weights copy unrenamed: our module names mirror LLaVA's. The config is a field-for-field translation (our
  `vision_feature_layer` already has LLaVA's meaning: an index into hidden_states) plus one setting of LLaVA's own,
  `vision_feature_select_strategy="full"`: SigLIP has no CLS token, and LLaVA's "default" would drop a real patch.
- Tensors are saved under the llava-hf names (`language_model.model.*`, `vision_tower.vision_model.*`, ...): the
  layout every LLaVA loader reads. transformers 5 maps them back on load; vLLM's SigLIP loader needs the
  `vision_model.` level that transformers 5 would otherwise flatten away.
- LLaVA's own placeholder `<image>` is the export's image token, so tools that write it into raw text (lmms-eval's
  loglikelihood tasks, LLaVA-1.5 prompts) work. It is added to the tokenizer as a special token at the first free id
  (151665 for Qwen2.5, whose embedding matrix has 151,936 rows for 151,665 tokens): a spare row, so the weights are
  unchanged, and its value never reaches the logits since image positions are overwritten by image features.
- The chat template writes `<|vision_start|><image><|vision_end|>` per image and LlavaProcessor expands the `<image>`
  to (image_size / patch_size)^2 copies: only the id at image positions differs from ours, so logits are identical.
  Pitfall: on the export `<|image_pad|>` in raw text is an ordinary token, no longer an image.
- Pixel shuffle cannot be exported: LLaVA's projector consumes one vision token per image token and has no place
  to fold patches together. Such checkpoints are refused before anything is written.
- `to_llava(model)` converts in memory, sharing the tensors (no copy, no disk): what a benchmark needs to run the
  same weights through both code paths.
"""

import copy
from pathlib import Path

import torch
from transformers import AddedToken, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from configuration_qwen_siglip import QwenSiglipConfig
from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
from processing_qwen_siglip import IMAGE_PLACEHOLDER, IMAGE_TOKEN, QwenSiglipProcessor

LLAVA_IMAGE_TOKEN = "<image>"  # the export's image token: what LLaVA-style prompts and tools write in raw text
LLAVA_IMAGE_PLACEHOLDER = IMAGE_PLACEHOLDER.replace(IMAGE_TOKEN, LLAVA_IMAGE_TOKEN)  # what its chat template writes


def llava_config(config: QwenSiglipConfig, image_token_id: int | None = None) -> LlavaConfig:
    """The LlavaConfig that computes exactly what `config` does; ValueError if LLaVA cannot express it.

    `image_token_id` replaces ours (`<|image_pad|>`), as the export does with `<image>`; the model computes the same.
    """
    if config.pixel_shuffle_factor != 1:
        raise ValueError(
            f"This checkpoint uses pixel_shuffle_factor={config.pixel_shuffle_factor}, which LLaVA cannot express: "
            "LLaVA's projector consumes one vision token per image token and has no pixel-shuffle step, so the "
            f"{config.grid_size**2} patches per image could not be folded into {config.num_image_tokens} image "
            "tokens. Only checkpoints trained with pixel_shuffle_factor=1 can be exported to LLaVA."
        )
    text_config = config.text_config.to_dict()
    # vLLM picks the LM implementation from text_config.architectures, which a config built in code may lack.
    if not text_config.get("architectures"):
        text_config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config["model_type"]]]
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),  # SigLIP, pooling head off: LLaVA builds the same tower
        text_config=text_config,
        image_token_index=config.image_token_id if image_token_id is None else image_token_id,
        image_seq_length=config.num_image_tokens,
        # same meaning: an index into hidden_states, or a list of them whose features are concatenated
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token: "default" would drop a real patch
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def to_llava(
    model: QwenSiglipForConditionalGeneration, image_token_id: int | None = None
) -> LlavaForConditionalGeneration:
    """The same model as a LlavaForConditionalGeneration, in memory. It shares `model`'s tensors: no copy is made,
    so changing the weights of one changes the other. The image token stays ours unless `image_token_id` is given
    (the export gives `<image>`'s, see `llava_processor`)."""
    # Built on the meta device: no memory and no random init (slow at full size), since every
    # tensor is taken from `model` just below.
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config(model.config, image_token_id))
    llava.load_state_dict(model.state_dict() | _identity_post_layernorm(model), strict=True, assign=True)
    # Non-persistent buffers (RoPE frequencies, SigLIP position ids) are not in the state dict; the submodules are
    # the same classes under the same names, so take them from `model` as well.
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        setattr(llava.get_submodule(owner), leaf, buffer)
    llava.tie_weights()  # assign=True loaded lm_head and the embeddings as two Parameters; make them one again
    leftover = [n for n, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"LLaVA has tensors with no counterpart in the QwenSiglip model: {leftover}")
    llava.generation_config = copy.deepcopy(model.generation_config)
    return llava.train(model.training)


def _identity_post_layernorm(model: QwenSiglipForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Weight 1, bias 0 for the SigLIP post-layernorm that LLaVA builds and we do not have.

    LLaVA reads hidden_states, which come before that LayerNorm, so its values change no output; they only have
    to exist for the folder to load cleanly (and an identity is the honest value for a layer that is not there).
    """
    like = model.model.vision_tower.embeddings.patch_embedding.weight  # the tower's dtype and device
    width = model.config.vision_config.hidden_size
    prefix = "model.vision_tower.post_layernorm."
    ones = torch.ones(width, dtype=like.dtype, device=like.device)
    return {prefix + "weight": ones, prefix + "bias": torch.zeros_like(ones)}


def llava_processor(processor: QwenSiglipProcessor, config: QwenSiglipConfig) -> LlavaProcessor:
    """A LlavaProcessor whose image token is `<image>` and that gives the same input_ids as `processor` for the same
    chat, except at image positions (`<image>`'s id instead of `<|image_pad|>`'s), and the same pixel_values."""
    image_processor = copy.deepcopy(processor.image_processor)
    tokenizer = copy.deepcopy(processor.tokenizer)
    # Saved QwenSiglip parts point AutoProcessor at our remote code; the export must not.
    for part in (image_processor, tokenizer.init_kwargs):
        _drop(part, "auto_map")
    _drop(tokenizer.init_kwargs, "processor_class")
    add_image_token(tokenizer, config.text_config.vocab_size)
    if IMAGE_PLACEHOLDER not in processor.chat_template:
        raise ValueError(
            f"The chat template never writes {IMAGE_PLACEHOLDER!r} for an image, so the export cannot make it write "
            f"{LLAVA_IMAGE_TOKEN!r} instead; export a checkpoint that uses QwenSiglip's chat template"
        )
    # Same wrappers as ours, so a chat gives our sequence; LlavaProcessor expands the <image> to the grid.
    chat_template = processor.chat_template.replace(IMAGE_PLACEHOLDER, LLAVA_IMAGE_PLACEHOLDER)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        # LlavaProcessor expands each image token to (height / patch_size) * (width / patch_size) copies, plus
        # num_additional_image_tokens, minus one under the "default" strategy: exactly our grid with both at rest.
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token=LLAVA_IMAGE_TOKEN,
        chat_template=chat_template,
    )


def add_image_token(tokenizer, text_vocab_size: int) -> int:
    """Add `<image>` to `tokenizer` (in place) as a special token at its first free id; returns that id.

    ValueError if the id has no spare embedding row (the weights would have to grow) or `<image>` is already a token
    (text that uses it would silently change meaning).
    """
    if (existing := tokenizer.get_vocab().get(LLAVA_IMAGE_TOKEN)) is not None:
        raise ValueError(
            f"The tokenizer already has a {LLAVA_IMAGE_TOKEN!r} token (id {existing}); the export needs a new one to "
            "make it LLaVA's image token"
        )
    token_id = len(tokenizer)  # the first id past every regular and added token
    if token_id >= text_vocab_size:
        raise ValueError(
            f"No spare embedding row for {LLAVA_IMAGE_TOKEN!r}: the tokenizer has {token_id} tokens and the language "
            f"model's embedding matrix {text_vocab_size} rows. The export adds {LLAVA_IMAGE_TOKEN!r} at id {token_id} "
            "without changing any weight, which needs text_config.vocab_size > len(tokenizer) (Qwen2.5: 151936 > "
            "151665)."
        )
    tokenizer.add_tokens([AddedToken(LLAVA_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    added = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    if added != token_id:  # a tokenizer with holes in its ids would put it elsewhere
        raise RuntimeError(f"{LLAVA_IMAGE_TOKEN!r} was added at id {added}, not at the first free id {token_id}")
    return token_id


def _drop(obj, key: str) -> None:
    if isinstance(obj, dict):
        obj.pop(key, None)
    elif hasattr(obj, key):
        delattr(obj, key)


def llava_hub_state_dict(llava: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """State dict whose saved names follow the llava-hf layout (`vision_tower.vision_model.*`, ...).

    transformers 5 saves LLaVA's top-level names in that layout by itself but writes a flat SigLIP
    (`vision_tower.embeddings.*`); vLLM's SigLIP loader only knows the `vision_model.` level, and transformers maps
    it back on load. So add that level here and let `save_pretrained` do the rest.
    """
    prefix = "model.vision_tower."
    return {
        (prefix + "vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in llava.state_dict().items()
    }


def export(src: str | Path, dst: str | Path) -> Path:
    """Convert the checkpoint folder `src` to a LLaVA folder `dst` (created; must be empty); returns `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        # Files left from an earlier export (other shards, remote code) would mix with the new ones.
        raise FileExistsError(f"{dst} is not empty; export into a new or empty folder")
    config = QwenSiglipConfig.from_pretrained(src)
    llava_config(config)  # refuse an inexpressible checkpoint before loading any weight
    # Given the config, AutoTokenizer need not read config.json, whose auto_map would ask to trust remote code.
    processor = QwenSiglipProcessor.from_pretrained(src, config=config)
    llava_proc = llava_processor(processor, config)  # refuses a tokenizer with no spare row for <image>, early too
    model = QwenSiglipForConditionalGeneration.from_pretrained(src).eval()
    llava = to_llava(model, image_token_id=llava_proc.image_token_id)
    dst.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(dst, state_dict=llava_hub_state_dict(llava))
    llava_proc.save_pretrained(dst)
    print(
        f"Exported {src} -> {dst}: LlavaForConditionalGeneration + LlavaProcessor, {config.num_image_tokens} image "
        f"tokens per image, image token {LLAVA_IMAGE_TOKEN} (id {llava_proc.image_token_id}), no remote code (for "
        "transformers serve, vLLM, SGLang, lmms-eval, transformers' AutoModelForImageTextToText)"
    )
    return dst
