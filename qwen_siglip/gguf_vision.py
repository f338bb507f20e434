"""The vision half of the GGUF export: SigLIP + our projector as an mmproj file for llama.cpp's `mtmd` library.

Notable:
- Projector type `mlp` (LLaVA-1.5's in llama.cpp's `clip` code): the tower, then `mm.0` -> GELU -> `mm.2`. The
  tower's features are taken where ours are: `clip.vision.feature_layer` holds our `vision_feature_layer` as
  non-negative indices into the hidden states (0 = the patch embeddings, n = the last layer, before any final
  LayerNorm, which we do not have and do not write). Without that key llama.cpp would drop the last layer.
- llama.cpp concatenates several feature layers in ascending order; ours follow the config's list. For a list in
  another order the columns of `mm.0` are permuted to match, so the product is the same. A layer listed twice is
  refused (llama.cpp would read it once).
- Normalisation and image size come from our image processor; the tower's activation from its config
  (`clip.use_gelu` = tanh-GELU, SigLIP's `gelu_pytorch_tanh`). Pitfall: llama.cpp's `mlp` projector always applies
  tanh-GELU, where our projector's "gelu" is the exact (erf) one: a small, bounded difference at every input (the
  README gives it; the embeddings test measures the whole path). Other projector activations are refused.
- Pixel shuffle is refused: llama.cpp's pixel-shuffle projectors (`idefics3`: one linear layer; `lfm2`: its own
  tiling, dynamic resolution and `<|image_start|>` wrapper tokens) do not compute what ours does.
- Pitfall (llama.cpp's loader): a tower whose MLP is as wide as its hidden size looks to it like an old export with
  swapped FFN weights, which it "fixes" by swapping them; such towers are refused.
"""

import numpy as np
import torch

from qwen_siglip.gguf_text import as_gguf_array

PROJECTOR_TYPE = "mlp"
# Our projector_hidden_act values that llama.cpp's mlp projector (tanh-GELU) computes, exactly or nearly (erf GELU).
PROJECTOR_ACTS = {"gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"}
TOWER_ACTS = {"gelu_pytorch_tanh": "use_gelu", "gelu_new": "use_gelu", "silu": "use_silu", "quick_gelu": None}


def check_vision(config, image_processor) -> None:
    """ValueError for anything llama.cpp's mlp projector path cannot compute as our model does."""
    v = config.vision_config
    if config.pixel_shuffle_factor != 1:
        raise ValueError(
            f"This checkpoint uses pixel_shuffle_factor={config.pixel_shuffle_factor}, which llama.cpp cannot run "
            "as we do: its `mlp` projector has no pixel shuffle, and its pixel-shuffle projectors compute something "
            "else (`idefics3`: a single linear layer; `lfm2`: its own tiling and dynamic image size, and "
            "<|image_start|>/<|image_end|> wrapper tokens our vocabulary lacks). Export a checkpoint trained with "
            "pixel_shuffle_factor=1."
        )
    if config.projector_hidden_act not in PROJECTOR_ACTS:
        raise ValueError(
            f"llama.cpp's mlp projector applies GELU; this projector uses {config.projector_hidden_act!r}"
        )
    if v.hidden_act not in TOWER_ACTS:
        raise ValueError(f"llama.cpp's clip tower has no {v.hidden_act!r} activation (tanh-GELU, SiLU, quick GELU)")
    if v.intermediate_size == v.hidden_size:
        raise ValueError(
            "the vision tower's intermediate_size equals its hidden_size; llama.cpp's loader takes such an mlp "
            "tower for an old export with swapped FFN weights and swaps them, so it would compute something else"
        )
    layers = feature_layers(config)
    if len(set(layers)) != len(layers):
        raise ValueError(f"vision_feature_layer {config.vision_feature_layer!r} lists a layer twice; llama.cpp reads "
                         "each feature layer once")  # fmt: skip
    check_image_processor(image_processor, v.image_size)


def check_image_processor(ip, image_size: int) -> None:
    """ValueError unless the processor does what llama.cpp's fixed-size preprocessing does to a square image:
    bicubic resize to image_size x image_size, rescale by 1/255, normalise by mean/std."""
    size = getattr(ip, "size", None) or {}
    problems = []
    if (size.get("height"), size.get("width")) != (image_size, image_size):
        problems.append(f"size {size} (the tower takes {image_size}x{image_size})")
    if not getattr(ip, "do_resize", True) or not getattr(ip, "do_normalize", True):
        problems.append("resizing or normalising switched off")
    if getattr(ip, "do_rescale", True) is False or abs(getattr(ip, "rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        problems.append(f"rescale factor {getattr(ip, 'rescale_factor', None)} (llama.cpp divides by 255)")
    if int(getattr(ip, "resample", 3)) != 3:  # PIL's BICUBIC; llama.cpp's mlp path resizes as Pillow's bicubic
        problems.append(f"resample {ip.resample} (llama.cpp resizes bicubically)")
    if problems:
        raise ValueError("the image processor differs from llama.cpp's preprocessing: " + "; ".join(problems))


def feature_layers(config) -> list[int]:
    """Our vision_feature_layer as non-negative hidden-state indices, in the config's order."""
    n_states = config.vision_config.num_hidden_layers + 1
    return [i % n_states for i in config.vision_feature_layers]


def projector_in_weight(config, weight: torch.Tensor) -> torch.Tensor:
    """`linear_1.weight` (D_text, D_vision * n_layers) with its column blocks in ascending layer order, the order in
    which llama.cpp concatenates the feature layers."""
    layers, width = feature_layers(config), config.vision_config.hidden_size
    order = sorted(range(len(layers)), key=lambda j: layers[j])
    return torch.cat([weight[:, j * width : (j + 1) * width] for j in order], dim=1)


def vision_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp (`clip`) name -> tensor for the tower and the projector; KeyError for a tensor with no place."""
    out = {}
    for name, tensor in model.model.vision_tower.state_dict().items():
        out[tower_tensor_name(name)] = tensor.detach()
    proj = model.model.multi_modal_projector
    out["mm.0.weight"] = projector_in_weight(model.config, proj.linear_1.weight.detach())
    out["mm.2.weight"] = proj.linear_2.weight.detach()
    for i, linear in ((0, proj.linear_1), (2, proj.linear_2)):
        # llama.cpp adds the biases unconditionally: a projector without them gets zeros, the same maths.
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
        out[f"mm.{i}.bias"] = bias
    return out


def tower_tensor_name(name: str) -> str:
    """SigLIP's state-dict name (`embeddings.patch_embedding.weight`, `encoder.layers.2.mlp.fc1.bias`) -> clip's."""
    import re

    fixed = {
        "embeddings.patch_embedding.weight": "v.patch_embd.weight",
        "embeddings.patch_embedding.bias": "v.patch_embd.bias",
        "embeddings.position_embedding.weight": "v.position_embd.weight",
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    per_layer = {
        "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.out_proj": "attn_out",
    }  # fmt: skip
    if not m or m[2] not in per_layer:
        raise KeyError(f"no llama.cpp clip tensor for the vision tower's {name!r}")
    return f"v.blk.{m[1]}.{per_layer[m[2]]}.{m[3]}"


def write_mmproj(model, image_processor, path, name: str) -> None:
    """The mmproj GGUF at `path`: matrices fp16, vectors fp32 (llama.cpp's usual mmproj-F16)."""
    import gguf

    config, v = model.config, model.config.vision_config
    check_vision(config, image_processor)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, PROJECTOR_TYPE)
    if act := TOWER_ACTS[v.hidden_act]:
        writer.add_bool(getattr(gguf.Keys.ClipVision, act.upper()), True)
    cv = gguf.Keys.ClipVision
    writer.add_uint32(cv.IMAGE_SIZE, v.image_size)
    writer.add_uint32(cv.PATCH_SIZE, v.patch_size)
    writer.add_uint32(cv.EMBEDDING_LENGTH, v.hidden_size)
    writer.add_uint32(cv.FEED_FORWARD_LENGTH, v.intermediate_size)
    writer.add_uint32(cv.BLOCK_COUNT, v.num_hidden_layers)
    writer.add_uint32(cv.PROJECTION_DIM, config.text_config.hidden_size)
    writer.add_uint32(cv.Attention.HEAD_COUNT, v.num_attention_heads)
    writer.add_float32(cv.Attention.LAYERNORM_EPS, v.layer_norm_eps)
    writer.add_array(cv.IMAGE_MEAN, [float(x) for x in np.broadcast_to(image_processor.image_mean, 3)])
    writer.add_array(cv.IMAGE_STD, [float(x) for x in np.broadcast_to(image_processor.image_std, 3)])
    # gguf-py has no constant for it yet; llama.cpp's clip loader reads this key (KEY_FEATURE_LAYERS)
    writer.add_array("clip.vision.feature_layer", sorted(feature_layers(config)))
    for tensor_name, tensor in vision_tensors(model).items():
        writer.add_tensor(tensor_name, as_gguf_array(tensor, half=True))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
