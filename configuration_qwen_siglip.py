"""QwenSiglip configuration: a SigLIP vision config and a Qwen2 text config, composed.

Notable:
- Both halves are ordinary transformers configs declared in `sub_configs_defaults` (exposed as `sub_configs`), so
  `attn_implementation=` and `dtype=` given to `from_pretrained` reach the vision tower and the LM alike.
- Our own fields are few: the image token, which vision layer(s) to read, the projector's activation and bias, and
  an optional pixel shuffle. The number of image tokens per image is *derived* (`num_image_tokens`), never stored.
- `vision_feature_layer` is an index into the tower's hidden_states or, as in LLaVA, a list of them whose features
  are concatenated: the projector's input width is `vision hidden * len(layers) * pixel_shuffle_factor^2`.
- Field names follow transformers' `LlavaConfig` where they mean the same thing, so an export to LLaVA is a copy.
- Impossible combinations fail here, at construction, with a `ValueError` that says what to change.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Written into every saved config.json so that each Auto class finds our code beside the weights. (A class can hold
# only one `_auto_class`, so the full map is kept here rather than spread over `register_for_auto_class` calls.)
AUTO_MAP = {
    "AutoConfig": "configuration_qwen_siglip.QwenSiglipConfig",
    "AutoModel": "modeling_qwen_siglip.QwenSiglipModel",
    "AutoModelForCausalLM": "modeling_qwen_siglip.QwenSiglipForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_qwen_siglip.QwenSiglipForConditionalGeneration",
}


class QwenSiglipConfig(PreTrainedConfig):
    model_type = "qwen_siglip"
    sub_configs_defaults = {
        # Defaults are the published google/siglip-base-patch16-224 and Qwen/Qwen2.5-0.5B-Instruct shapes; the
        # real values live in the repo's config.json, these only make `QwenSiglipConfig()` a sane object.
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    # Qwen's own <|image_pad|>: the pretrained vocabulary already has it, so embeddings never have to grow.
    image_token_id: int = 151655
    # LLaVA semantics: an index into the vision encoder's hidden_states tuple (-1 = last layer, before the final
    # LayerNorm), or a list of indices whose features are concatenated. SigLIP has no CLS token: every patch is kept.
    vision_feature_layer: int | list[int] = -1
    # LLaVA's projector: Linear -> act -> Linear; GELU as in LLaVA-1.5.
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    # 1 = off. s > 1 folds each s x s block of patches into one token (s^2 fewer image tokens, s^2 wider features).
    pixel_shuffle_factor: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The LM decides whether lm_head shares the embedding matrix (Qwen2.5-0.5B does); the top-level flag is the
        # one PreTrainedModel reads when tying.
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
        self.vision_config.vision_use_head = False  # the pooling head is never used by a VLM (and breaks DDP)
        # Keep entries a Hub loader prefixed with its repo id ("user/repo--configuration_...") over ours.
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self._validate()

    def _validate(self) -> None:
        v, t = self.vision_config, self.text_config
        if v.image_size % v.patch_size:
            raise ValueError(f"vision_config.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        s = self.pixel_shuffle_factor
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"pixel_shuffle_factor must be an integer >= 1, got {s!r}")
        if self.grid_size % s:
            raise ValueError(
                f"pixel_shuffle_factor {s} does not divide the {self.grid_size}x{self.grid_size} patch grid "
                f"(image_size {v.image_size} / patch_size {v.patch_size}); pick a divisor of {self.grid_size}"
            )
        layers = self.vision_feature_layers
        n_states = v.num_hidden_layers + 1  # embeddings output + one per layer
        if not layers or not all(isinstance(i, int) and -n_states <= i < n_states for i in layers):
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer!r} must be an index, or a non-empty list of "
                f"indices, into the hidden states of a vision tower with {v.num_hidden_layers} layers (valid: "
                f"{-n_states}..{n_states - 1})"
            )
        if not 0 <= self.image_token_id < t.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the text vocabulary ({t.vocab_size})")

    @property
    def grid_size(self) -> int:
        """Patches per side of the vision grid, e.g. 224 / 16 = 14."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def vision_feature_layers(self) -> list[int]:
        """`vision_feature_layer` as a list: the hidden states whose features are concatenated, in order."""
        layer = self.vision_feature_layer
        return list(layer) if isinstance(layer, (list, tuple)) else [layer]

    @property
    def context_length(self) -> int:
        """The LM's context (prompt + answer), rope scaling included as transformers applies it: a scaled rope reaches
        `factor` x its pretraining length (`original_max_position_embeddings`, else `max_position_embeddings`)."""
        t = self.text_config
        rope = getattr(t, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") == "default" or not rope.get("factor"):
            return t.max_position_embeddings
        original = rope.get("original_max_position_embeddings") or t.max_position_embeddings
        return max(t.max_position_embeddings, int(original * rope["factor"]))

    @property
    def num_image_tokens(self) -> int:
        """LM tokens per image: 196 for SigLIP-base-224, 49 with pixel_shuffle_factor=2."""
        return (self.grid_size // self.pixel_shuffle_factor) ** 2


QwenSiglipConfig.register_for_auto_class()  # save_pretrained copies this file beside config.json

__all__ = ["QwenSiglipConfig"]
