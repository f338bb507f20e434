"""QwenSiglip: a SigLIP vision tower and a Qwen2 LM joined by a two-layer MLP projector.

Notable:
- Composed, not rewritten: the tower and the LM come from `AutoModel.from_config` of the sub-configs. Our code is
  the projector (with an optional pixel shuffle in front), the merge of image features into the LM's input
  embeddings at the image-token positions, and the loss.
- Module names mirror transformers' LLaVA (`model.vision_tower`, `model.multi_modal_projector.linear_1/2`,
  `model.language_model`, `lm_head`), so exporting to `LlavaForConditionalGeneration` copies weights unrenamed.
- `base_model_prefix = "model"` and `QwenSiglipModel` returns `last_hidden_state`: TRL's SFTTrainer swaps our
  forward for a fused LM head that calls `model.model(...)`, so nothing essential may live only in the top forward.
- A frozen vision tower runs under `no_grad`: training then keeps none of its activations.
- transformers 5's model contract, as its LLaVA: `cache=` (not the deprecated `past_key_values=`), `return_dict=False`
  tuples, `inputs_embeds` + `pixel_values` (placeholders found from the embeddings), `get_image_features` returning
  an output object whose `pooler_output` holds the projected features, the `lm_head` tensor-parallel entry.
- No parameter that nothing uses (an unused trainable one fails DDP): SigLIP's post_layernorm is removed.
- Decoding never raises over an image token: the builder's generation config suppresses `<|image_pad|>`, and with a
  cache an image token without pixels stays a plain token, as in LLaVA.
- Bad input is refused before torch sees it: ids outside the vocabulary, integer or non-finite pixel_values, and
  sequences past the LM's context, rope scaling included (`check_inputs`, `check_pixels`).
"""

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

try:  # a saved checkpoint imports its sibling file as part of a dynamic package
    from .configuration_qwen_siglip import QwenSiglipConfig
except ImportError:  # the repo itself, imported as top-level modules
    from configuration_qwen_siglip import QwenSiglipConfig


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Fold each `factor x factor` block of patches into one token: (B, N, D) -> (B, N / f^2, D * f^2)."""
    if factor == 1:
        return x
    b, n, d = x.shape
    side = int(n**0.5)
    x = x.view(b, side // factor, factor, side // factor, factor, d)  # (B, h, f, w, f, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h, w, f, f, D): the f x f neighbours of a block sit together
    return x.reshape(b, (side // factor) ** 2, factor * factor * d)


class QwenSiglipMultiModalProjector(nn.Module):
    """LLaVA's projector: Linear -> GELU -> Linear, from (shuffled) vision width to the LM's hidden size."""

    def __init__(self, config: QwenSiglipConfig):
        super().__init__()
        n_layers = len(config.vision_feature_layers)  # LLaVA concatenates several layers' features
        in_features = config.vision_config.hidden_size * n_layers * config.pixel_shuffle_factor**2
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_features, hidden, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class QwenSiglipPreTrainedModel(PreTrainedModel):
    config: QwenSiglipConfig
    config_class = QwenSiglipConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache"]
    # Checkpoints saved before post_layernorm was dropped (see QwenSiglipModel) still hold its weights: unused.
    _keys_to_ignore_on_load_unexpected = [r"vision_tower\.post_layernorm\."]
    _no_split_modules = ["SiglipEncoderLayer", "Qwen2DecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the image/token count check reads a tensor value


class QwenSiglipModel(QwenSiglipPreTrainedModel):
    """Vision tower + projector + LM body (no LM head); returns the LM's `last_hidden_state`."""

    def __init__(self, config: QwenSiglipConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        # Pitfall: SigLIP's post_layernorm only makes `last_hidden_state`; we (and LLaVA, and vLLM) read
        # `hidden_states[k]`, which come before it. Kept, its parameters would never get a gradient, and DDP with
        # find_unused_parameters=False (the Trainer's choice under activation checkpointing) fails at step 2 once
        # the tower trains. So it is not there at all; an export writes an identity LayerNorm for LLaVA instead.
        self.vision_tower.post_layernorm = nn.Identity()
        self.multi_modal_projector = QwenSiglipMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | list[int] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """(n_images, 3, H, W) pixels -> the tower's output, with `pooler_output` = the LM-ready features.

        As transformers 5's VLMs do: `last_hidden_state`/`hidden_states` are the tower's (no post-layernorm), and
        `pooler_output` is a list of n_images tensors (num_image_tokens, text_hidden), what the LM receives.
        `hidden_states` and `attentions` (eager attention only) are returned when asked, as by SigLIP itself.
        """
        self.check_pixels(pixel_values)
        layers = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        layers = layers if isinstance(layers, (list, tuple)) else [layers]
        # A frozen tower needs no activations kept for backward: run it without autograd (saves memory and time).
        tower_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(tower_trains):
            out = self.vision_tower(
                pixel_values.to(self.vision_tower.dtype),
                output_hidden_states=True,  # the features are read from them, whatever the caller asked
                output_attentions=bool(output_attentions),
                return_dict=True,
            )
        # LLaVA: one layer's features, or several concatenated on the feature axis: (n_images, N, Dv * n_layers)
        features = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        features = pixel_shuffle(features, self.config.pixel_shuffle_factor)  # (n_images, N/s^2, Dv*n*s^2)
        projected = self.multi_modal_projector(features)  # (n_images, num_image_tokens, D)
        return BaseModelOutputWithPooling(
            last_hidden_state=out.last_hidden_state,
            pooler_output=list(projected),
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions if output_attentions else None,
        )

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """ValueError for pixels the processor would never give: wrong shape, raw integers, NaN or infinity."""
        size = self.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must have shape (num_images, 3, {size}, {size}), got {tuple(pixel_values.shape)}; use "
                "the model's processor to resize images"
            )
        if not pixel_values.is_floating_point():  # cast to float, 0..255 would reach a tower that expects ~[-1, 1]
            raise ValueError(
                f"pixel_values have dtype {pixel_values.dtype}: raw integer pixels, the processor was skipped. Pass "
                "images through the model's processor, which rescales and normalises them to floats"
            )
        if not torch.isfinite(pixel_values).all():  # one device sync; NaN pixels would give NaN logits silently
            raise ValueError("pixel_values hold NaN or infinite values; pass images through the model's processor")

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: where the image tokens are, from input_ids or, without them, from the embeddings (as LLaVA).

        Pitfall: with inputs_embeds only, an image token is recognised by its embedding row, so embeddings that
        already hold merged image features (or a modified image-token row) find no placeholders.
        """
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(token)).all(-1)

    def merge_image_features(
        self, mask: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write image features (n_images, T, D), in order, over the embeddings where `mask` (B, L) is True."""
        n_tokens, n_features = int(mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: the text holds {n_tokens} image tokens, the "
                f"{image_features.shape[0]} image(s) give {n_features} features "
                f"({self.config.num_image_tokens} per image). Each image needs exactly one placeholder expanded by "
                "the processor, and truncation must not cut through an image."
            )
        features = image_features.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    def check_inputs(
        self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None, past_length: int, length: int
    ) -> None:
        """ValueError for ids outside the vocabulary and for positions past the LM's context, before torch sees them.

        Without this an out-of-range id is an IndexError deep in the embedding, and a sequence past the context
        runs silently: RoPE extrapolates and the LM writes nonsense.
        """
        vocab, context = self.config.text_config.vocab_size, self.config.context_length
        ids = input_ids if input_ids is not None and input_ids.numel() else None
        if ids is not None and (ids.is_floating_point() or ids.dtype == torch.bool):
            raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        # One device sync for all three bounds (min id, max id, last position): this runs on every decode step.
        bounds = [ids.min(), ids.max()] if ids is not None else []
        bounds += [position_ids.max()] if position_ids is not None else []
        bounds = torch.stack([b.long() for b in bounds]).tolist() if bounds else []
        if ids is not None and (bounds[0] < 0 or bounds[1] >= vocab):
            bad = ((ids < 0) | (ids >= vocab)).nonzero()[0].tolist()
            raise ValueError(
                f"input_ids hold id {int(ids[tuple(bad)])} at position {tuple(bad)}, outside the LM's "
                f"vocabulary (0..{vocab - 1}); was the text encoded with another model's tokenizer?"
            )
        end = bounds[-1] + 1 if position_ids is not None else past_length + length
        if end > context:
            raise ValueError(
                f"The sequence reaches position {end} ({past_length} cached + {length} new tokens), past the LM's "
                f"context of {context} tokens (config.context_length: max_position_embeddings, rope scaling "
                "included). Shorten the prompt, or lower max_new_tokens so that prompt + new tokens fit."
            )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        past_length = cache.get_seq_length() if cache is not None else 0
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        self.check_inputs(input_ids, position_ids, past_length, length)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, D)
        mask = self.get_placeholder_mask(input_ids, inputs_embeds)  # (B, L)
        if pixel_values is not None and (mask.any() or past_length == 0):
            features = self.get_image_features(pixel_values=pixel_values).pooler_output
            inputs_embeds = self.merge_image_features(mask, inputs_embeds, torch.stack(features))
        elif mask.any() and past_length == 0:
            raise ValueError(
                "Image features and image tokens do not match: the text holds image tokens but no pixel_values "
                "were given"
            )
        # Otherwise, with a cache: pixel_values with no placeholder left in the new tokens were consumed at prefill
        # (a continuation re-passing them), and an image token with no pixels (one the model generated, or a
        # continuation's) stays a plain token embedding, as in LLaVA: decoding must never raise over it.
        lm_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache)
        return self.language_model(inputs_embeds=inputs_embeds, **lm_kwargs, **kwargs)


class QwenSiglipForConditionalGeneration(QwenSiglipPreTrainedModel, GenerationMixin):
    """The full VLM with its LM head: what `AutoModelForCausalLM`/`AutoModelForImageTextToText` load."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Tensor parallelism (LLaVA's entry): each rank computes a slice of the vocabulary, then the logits are gathered.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: QwenSiglipConfig):
        super().__init__(config)
        self.model = QwenSiglipModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        inputs = dict(input_ids=input_ids, pixel_values=pixel_values, inputs_embeds=inputs_embeds)
        lm_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache)
        out = self.model(**inputs, **lm_kwargs, return_dict=True, **kwargs)
        hidden = out.last_hidden_state  # (B, L, D)
        # Generation only needs the last position's logits: skip the (B, L, vocab) matmul for the rest.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            if input_ids is not None:  # image tokens are inputs, never targets, whatever the collator did
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            loss = self.loss_function(logits, labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        states = dict(cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **states)


# save_pretrained copies this file (and the config file it imports) beside the weights; config.auto_map lists the
# other Auto classes.
QwenSiglipForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["QwenSiglipForConditionalGeneration", "QwenSiglipModel", "QwenSiglipPreTrainedModel"]
