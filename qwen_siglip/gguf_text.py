"""The language-model half of the GGUF export: a file llama.cpp reads as its own `qwen2` architecture.

Notable:
- Tensor names and hyper-parameter keys are llama.cpp's (its `qwen2` loader and gguf-py's constants); every tensor
  of our LM must have a name here, or the export stops: nothing is dropped silently.
- The tokenizer travels whole: byte-level BPE vocabulary and merges (`gpt2` model, `qwen2` pre-tokenizer, checked
  against the tokenizer's own split regex), one entry per embedding row (rows past the tokenizer are `[PAD<id>]`,
  type unused, as llama.cpp's converter writes them), special tokens as control tokens, other added tokens as
  user-defined ones.
- The chat template is ours (no default system prompt), adapted to how llama.cpp passes images: its chat handlers
  turn each image into a text marker before rendering (`<__media__>`; llama-server's is `<__media_<random>__>`, in
  a message joined into one string), so the template wraps every marker in `<|vision_start|>` ... `<|vision_end|>`
  itself (the runtime's `mlp` projector adds no wrapper tokens). TRL's `{% generation %}` markers are dropped: they
  only mark training targets, and not every runtime's Jinja knows them.
- End of generation: the generation config's end ids become `eos_token_id` and `eot_token_id` (GGUF has room for
  two); its `suppress_tokens` (our `<|image_pad|>`) become `tokenizer.ggml.suppress_tokens`, which llama.cpp's own
  sampler (llama-server, llama-mtmd-cli) applies. Pitfall: llama-cpp-python's sampler does not read that key; pass
  `logit_bias` there (README).
"""

import json
import re

import numpy as np
import torch

from processing_qwen_siglip import IMAGE_PLACEHOLDER, VISION_END, VISION_START

ARCH = "qwen2"
MEDIA_MARKER = "<__media__>"  # llama.cpp's default image marker (mtmd_default_marker), what its handlers write
MEDIA_PLACEHOLDER = VISION_START + MEDIA_MARKER + VISION_END  # one image, as the GGUF's template writes it
# The split regex of Qwen2's pre-tokenizer: llama.cpp implements it as pre-tokenizer type "qwen2".
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Our chat template's text macro (processing_qwen_siglip.CHAT_TEMPLATE): the GGUF's also wraps each media marker.
TEXT_MACRO = re.compile(r"\{%- macro text_of\(s\) -%\}\{\{- (?P<escaped>.+?) -\}\}\{%- endmacro -%\}")
# Pitfall: llama-server's marker is `<__media_<random>__>` (llama-mtmd-cli's and llama-cpp-python's `<__media__>`),
# so the macro wraps any `<__media...__>`; split() with a count is the one tool both Jinja engines (Python's and
# llama.cpp's own) have for it. Its text must stay one line: the template is Jinja source.
WRAPPING_MACRO = (
    (
        "{%- macro text_of(s) -%}{%- set parts = (ESCAPED).split('<__media') -%}{{- parts[0] -}}"
        "{%- for p in parts[1:] -%}{%- set rest = p.split('__>', 1) -%}"
        "{%- if rest | length > 1 -%}{{- 'VS<__media' + rest[0] + '__>VE' + rest[1] -}}"
        "{%- else -%}{{- '<__media' + p -}}{%- endif -%}{%- endfor -%}{%- endmacro -%}"
    )
    .replace("VS", VISION_START)
    .replace("VE", VISION_END)
)
GENERATION_TAGS = re.compile(r"{%-?\s*(?:end)?generation\s*-?%}")


def check_text_config(text_config) -> None:
    """ValueError for an LM that llama.cpp's `qwen2` graph would not compute as transformers does."""
    t = text_config
    if t.model_type != "qwen2":
        raise ValueError(f"the GGUF export writes a Qwen2 LM; this checkpoint's LM is {t.model_type!r}")
    rope = getattr(t, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"the LM uses RoPE scaling {rope.get('rope_type')!r}; the GGUF export writes plain RoPE only. Export a "
            "checkpoint without rope scaling"
        )
    if getattr(t, "use_sliding_window", False):
        raise ValueError("the LM uses sliding-window attention, which the GGUF export does not write")
    if t.hidden_act != "silu":
        raise ValueError(f"llama.cpp's qwen2 graph uses SiLU; this LM's hidden_act is {t.hidden_act!r}")


def lm_tensor_name(name: str) -> str:
    """Our LM's state-dict name (`embed_tokens.weight`, `layers.3.self_attn.q_proj.bias`, `lm_head.weight`) ->
    llama.cpp's; KeyError for a tensor llama.cpp's qwen2 has no place for."""
    fixed = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    if not m or m[2] not in per_layer:
        raise KeyError(f"no llama.cpp qwen2 tensor for the LM's {name!r}")
    return f"blk.{m[1]}.{per_layer[m[2]]}.{m[3]}"


def lm_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> tensor, for the LM of a QwenSiglipForConditionalGeneration. A tied head is not written:
    llama.cpp's qwen2 reuses `token_embd` when `output.weight` is absent, as transformers ties it."""
    state = {k: v for k, v in model.model.language_model.state_dict().items()}
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    return {lm_tensor_name(k): v.detach() for k, v in state.items()}


def as_gguf_array(tensor: torch.Tensor, half: bool) -> np.ndarray:
    """Matrices in fp16 when `half`, vectors (norms, biases) always fp32, as llama.cpp's converter writes them."""
    dtype = np.float16 if half and tensor.dim() >= 2 else np.float32
    return tensor.float().cpu().numpy().astype(dtype)


def add_lm_hparams(writer, text_config, context_length: int) -> None:
    """The qwen2 keys llama.cpp's loader reads."""
    import gguf

    t, llm = text_config, gguf.Keys.LLM
    writer.add_uint32(llm.CONTEXT_LENGTH.format(arch=ARCH), context_length)
    writer.add_uint32(llm.EMBEDDING_LENGTH.format(arch=ARCH), t.hidden_size)
    writer.add_uint32(llm.BLOCK_COUNT.format(arch=ARCH), t.num_hidden_layers)
    writer.add_uint32(llm.FEED_FORWARD_LENGTH.format(arch=ARCH), t.intermediate_size)
    writer.add_uint32(gguf.Keys.Attention.HEAD_COUNT.format(arch=ARCH), t.num_attention_heads)
    writer.add_uint32(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH), t.num_key_value_heads)
    writer.add_float32(gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=ARCH), t.rms_norm_eps)
    writer.add_float32(gguf.Keys.Rope.FREQ_BASE.format(arch=ARCH), float(t.rope_parameters["rope_theta"]))
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    if head_dim != t.hidden_size // t.num_attention_heads:  # llama.cpp derives it from the width otherwise
        writer.add_uint32(gguf.Keys.Attention.KEY_LENGTH.format(arch=ARCH), head_dim)
        writer.add_uint32(gguf.Keys.Attention.VALUE_LENGTH.format(arch=ARCH), head_dim)


def vocabulary(tokenizer, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for `tokenizer.ggml.*`: one token per embedding row, in id order."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    check_pre_tokenizer(spec)
    tokens: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        tokens[added["id"]] = (added["content"], kind)
    if max(tokens) >= n_rows:
        raise ValueError(
            f"the tokenizer has id {max(tokens)} but the LM's embedding matrix only {n_rows} rows: they do not match"
        )
    # Rows no token uses (Qwen2.5: 151936 rows for 151,665 tokens) still need an entry: llama.cpp counts them.
    entries = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(n_rows)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return [t for t, _ in entries], [int(k) for _, k in entries], merges


def check_pre_tokenizer(spec: dict) -> None:
    """ValueError unless the tokenizer is byte-level BPE split by Qwen2's regex (llama.cpp's "qwen2" pre type)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    split = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    regex = split[0].get("pattern", {}).get("Regex") if split else None
    if spec["model"]["type"] != "BPE" or regex != QWEN2_SPLIT_REGEX or len(byte_level) != 1 or len(steps) != 2:
        raise ValueError(
            "the tokenizer is not Qwen2's byte-level BPE (Qwen2 split regex, then ByteLevel): llama.cpp would "
            f"pre-tokenize text differently. Found model {spec['model']['type']!r}, pre-tokenizer {json.dumps(pre)}"
        )


def end_ids(model) -> tuple[int, int | None]:
    """(eos, second end id or None) from the generation config (what `generate` stops on)."""
    g, t = model.generation_config, model.config.text_config
    ids = g.eos_token_id if g.eos_token_id is not None else t.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(dict.fromkeys(ids or []))
    if not ids or len(ids) > 2:
        raise ValueError(
            f"the generation config ends on {ids!r}; a GGUF names one or two end tokens (eos_token_id, eot_token_id)"
        )
    return ids[0], (ids[1] if len(ids) > 1 else None)


def gguf_chat_template(template: str) -> str:
    """Our chat template as the GGUF carries it: images become the wrapped media marker, whether they come as
    `{"type": "image"}` items or as the marker text llama.cpp's handlers write; no `{% generation %}` markers."""
    macro = TEXT_MACRO.search(template)
    if IMAGE_PLACEHOLDER not in template or macro is None:
        raise ValueError(
            "the checkpoint's chat template is not QwenSiglip's (no image placeholder or text macro found), so "
            "the export cannot adapt it to llama.cpp's image marker; export a checkpoint that uses our template"
        )
    wrapping = WRAPPING_MACRO.replace("ESCAPED", macro["escaped"])
    template = template.replace(macro[0], wrapping).replace(IMAGE_PLACEHOLDER, MEDIA_PLACEHOLDER)
    return GENERATION_TAGS.sub("", template)


def add_tokenizer(writer, model, tokenizer, chat_template: str) -> None:
    """Vocabulary, special ids, suppressed tokens and the chat template."""
    tokens, types, merges = vocabulary(tokenizer, model.config.text_config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos, second = end_ids(model)
    writer.add_eos_token_id(eos)
    if second is not None:  # llama.cpp ends generation on both (and on <|im_end|>/<|endoftext|> by name)
        writer.add_eot_token_id(second)
    g, t = model.generation_config, model.config.text_config
    pad = g.pad_token_id if g.pad_token_id is not None else t.pad_token_id
    if pad is not None:
        writer.add_pad_token_id(pad)
    # Qwen adds no BOS; llama.cpp's BPE default would be id 11, so name one and say it is never added.
    bos = t.bos_token_id if t.bos_token_id is not None else pad
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(False)
    if g.suppress_tokens:
        writer.add_array("tokenizer.ggml.suppress_tokens", [int(i) for i in g.suppress_tokens])
    writer.add_chat_template(gguf_chat_template(chat_template))
