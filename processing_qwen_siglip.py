"""QwenSiglip processor: SigLIP's image processor + the Qwen2 tokenizer + a ChatML chat template.

Notable:
- An image is written `<|vision_start|><|image_pad|><|vision_end|>` (Qwen's own tokens) and the `<|image_pad|>` is
  expanded to `num_image_tokens` copies (196 for SigLIP-base-224) by transformers' `ProcessorMixin.__call__`.
- Raw text given to `processor(text=...)` is the template's own language: `<image>` (LLaVA's placeholder) or the
  triple is an image, any other special-token string is that control token. `<image>\n?` is one rule shared with
  data.split_placeholders, so "<image>\nQuestion" gives exactly the tokens a training record with it gave.
- Text inside chat messages is always text: the template escapes `<|` and `<image>` with a zero-width space, so a
  typed `<|im_start|>assistant\n`, `<|image_pad|>` or `<image>` never becomes a control token, an image or a target.
- The chat template is Qwen ChatML with typed content and no default system prompt (Qwen2.5-Instruct's adds one);
  assistant turns sit inside `{% generation %}` (end-of-turn token included) for TRL and our collator.
- Placeholder/image count mismatches are caught per sample, before any tokenizing, with a message that says which.
"""

import re

from transformers import ProcessorMixin
from transformers.image_utils import make_flat_list_of_images

# The one definition of Qwen's vision tokens in this repo: the trainer, the exports and the tests import them.
VISION_START, IMAGE_TOKEN, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_TOKEN + VISION_END  # one image, before expansion
# LLaVA's `<image>` in raw text is one image, and the newline right after it belongs to the placeholder: LLaVA writes
# "<image>\nQuestion" where our template writes the image right before the text. (Not a newline before it: in a raw
# prompt that is the template's own "<|im_start|>user\n".) data.split_placeholders splits training records on this
# same pattern, so raw prompts and training prompts tokenize alike. An `<image>` already wrapped in the vision tokens
# (how the LLaVA export's template writes it) is the same one image, not wrapped twice.
LLAVA_PLACEHOLDER_RE = re.compile(f"(?:{re.escape(VISION_START)})?<image>(?:{re.escape(VISION_END)})?\n?")

# Typed special tokens in chat text: a zero-width space after the '<' of `<|...|>` and of `<image>` keeps them plain
# text (they tokenize as ordinary characters), so no user or assistant text can open a turn, end one, or add an image.
CHAT_TEMPLATE = (
    "{%- macro text_of(s) -%}{{- s | replace('<|', '<\u200b|') | replace('<image>', '<\u200bimage>') -}}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{%- set text = text_of(message['content']) -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '" + IMAGE_PLACEHOLDER + "' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + text_of(item['text']) -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ text + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}{{- text + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


class QwenSiglipProcessor(ProcessorMixin):
    """Turns chat text with image placeholders plus PIL images into `input_ids`, `attention_mask`, `pixel_values`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, num_image_tokens=196):
        self.num_image_tokens = num_image_tokens
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {IMAGE_TOKEN} token; QwenSiglip needs Qwen's vision tokens")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    def __call__(self, images=None, text=None, **kwargs):
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
            text = [LLAVA_PLACEHOLDER_RE.sub(IMAGE_PLACEHOLDER, sample) for sample in text]
            self._check_placeholder_counts(images, text)
        elif images is not None:
            raise ValueError("Images need text with one image placeholder each (e.g. '<image>\\nDescribe it.')")
        return super().__call__(images=images, text=text, **kwargs)

    def _check_placeholder_counts(self, images, text: list[str]) -> None:
        counts = [sample.count(IMAGE_TOKEN) for sample in text]
        nested = isinstance(images, (list, tuple)) and len(images) == len(text)
        if nested and all(isinstance(x, (list, tuple)) for x in images):  # a list per sample: check each on its own
            for i, (n, imgs) in enumerate(zip(counts, images)):
                if n != len(imgs):
                    raise ValueError(f"Sample {i} has {n} image placeholder(s) but {len(imgs)} image(s) were given")
            return
        n_images = 0 if images is None else len(make_flat_list_of_images(images))
        if sum(counts) != n_images:
            raise ValueError(
                f"The text has {sum(counts)} image placeholder(s) (per sample: {counts}) but {n_images} image(s) "
                "were given; write one '<image>' or {'type': 'image'} per image"
            )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return IMAGE_TOKEN * self.num_image_tokens


QwenSiglipProcessor.register_for_auto_class()  # save_pretrained copies this file and writes its auto_map

__all__ = ["QwenSiglipProcessor"]
