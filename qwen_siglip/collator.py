"""Batch collation for training: chat messages + images -> input_ids, attention_mask, pixel_values, labels.

Notable:
- Labels are built here, not in the model: during training TRL replaces the model's forward with a fused LM head
  that never sees our top-level forward. Only assistant tokens are targets (every assistant turn of a multi-turn
  chat, its closing `<|im_end|>` included). System and user text, image tokens and padding are -100.
- Assistant spans come from the message structure, not from token patterns: the chat template marks each answer
  with `{% generation %}`, the rendered chat is cut at those spans and each segment is tokenized on its own. A
  prompt segment ends with `<|im_start|>assistant\\n`, exactly what generate() continues from at inference; the
  labels are exactly the answer segment's tokens (its text + `<|im_end|>`), whatever the user wrote.
- Pitfall this avoids: tokenized whole, Qwen's BPE merges the header's "\\n" with an answer's leading "\\n" into
  one token ("\\n\\n"), so a search for the header tokens misses that answer; and a user's typed
  `<|im_start|>assistant\\n` would pose as a header (the template escapes typed special tokens).
- Truncation never cuts through an image: an over-long sample loses only text after its last image; if even that
  is not enough, or nothing trainable is left, the sample is skipped and counted.
- `None` examples (images that failed to decode in the dataset) are dropped and counted too. A batch whose examples
  all fail is replaced by the last good example (counted as `batch_replaced`), so a non-strict run never dies on data.
"""

import logging
import re
from collections import Counter

import torch
from transformers.utils.chat_template_utils import render_jinja_template

from processing_qwen_siglip import IMAGE_TOKEN, VISION_END, VISION_START

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class VLMCollator:
    """Collate `{"messages": [...], "images": [PIL, ...]}` examples for `SFTTrainer(data_collator=...)`."""

    def __init__(
        self,
        processor,
        max_length: int | None = 1024,
        pad_to_multiple_of: int | None = None,
        strict: bool = False,
    ):
        """`strict`: a batch whose examples all fail raises instead of being replaced (training's --strict)."""
        self.processor = processor
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.strict = strict
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.vision_end = tok.convert_tokens_to_ids(VISION_END)
        self.vision_ids = set(tok.convert_tokens_to_ids([VISION_START, IMAGE_TOKEN, VISION_END]))
        if not GENERATION_TAG.search(processor.chat_template or ""):
            raise ValueError("The processor's chat template must mark assistant turns with {% generation %}")
        self.skipped: Counter = Counter()
        self.spare: tuple | None = None  # the last good row, to stand in for a later batch whose examples all fail

    def __call__(self, examples: list[dict | None]) -> dict[str, torch.Tensor]:
        rows = self.usable_rows(self.encode, examples)
        batch = self.pad([row[:2] for row in rows])
        pixels = [p for row in rows for p in row[2]]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)  # (n_images, 3, H, W), in order of appearance
        return batch

    def usable_rows(self, encode, examples: list[dict | None]) -> list[tuple]:
        """`encode(example)` of every example that encodes; the first becomes the spare. If none does, the spare."""
        rows = [row for row in map(encode, examples) if row is not None]
        if not rows:
            return self._replacement_rows()
        self.spare = rows[0]
        return rows

    def _replacement_rows(self) -> list[tuple]:
        """Every example failed. Non-strict: train on the last good example again (counted) rather than die
        mid-run; an empty batch would break the Trainer and an all -100 batch would divide the loss by zero."""
        if self.strict or self.spare is None:  # strict, or the very first batch: nothing to stand in
            raise ValueError(f"Every example of this batch was skipped ({dict(self.skipped)}); see the warnings above")
        self.skipped["batch_replaced"] += 1
        logger.warning(
            f"Every example of a batch failed; trained on the last good example instead ({dict(self.skipped)})"
        )
        return [self.spare]

    def encode(self, example: dict | None) -> tuple[list[int], list[int], list[torch.Tensor]] | None:
        """Token ids, labels and pixel values of one example, truncated safely; None (counted) if unusable."""
        if example is None or example.get("messages") is None:  # data.to_hf() gives all-None fields
            return self._skip("undecodable_image")
        segments = self.segments(example["messages"])
        if not any(answer for _, answer in segments):
            return self._skip("no_assistant_tokens_left")
        texts, is_answer = zip(*segments)
        try:  # one processor call for all segments: it expands each image placeholder and checks them against images
            enc = self.processor(text=list(texts), images=example["images"] or None)
        except ValueError as err:
            logger.warning(f"Bad example: {err}")
            return self._skip("placeholder_image_mismatch")
        ids, labels = [], []
        for segment, answer in zip(enc["input_ids"], is_answer):  # one unpadded list of ids per segment
            ids += segment
            labels += [t if answer and t not in self.vision_ids else IGNORE_INDEX for t in segment]
        pixels = [torch.as_tensor(p) for p in enc.get("pixel_values", [])]  # (3, H, W) each, in order
        if self.max_length is not None and len(ids) > self.max_length:
            last_image_end = max((i for i, t in enumerate(ids) if t == self.vision_end), default=-1)
            if last_image_end >= self.max_length:
                return self._skip("too_long_image_would_be_cut")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return self._skip("no_assistant_tokens_left")
        return ids, labels, pixels

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered chat cut at the template's `{% generation %}` spans: [(text, is_answer), ...] in order.

        An answer segment is one assistant turn's text + `<|im_end|>`; the segments between (system and user turns,
        each `<|im_start|>assistant\\n` header, the newline after an `<|im_end|>`) are prompt. Joined: the chat.
        """
        # transformers' own renderer, the one apply_chat_template uses; it returns the spans that tokenize=False drops.
        (chat,), (spans,) = render_jinja_template(
            conversations=[messages],
            chat_template=self.processor.chat_template,
            return_assistant_tokens_mask=True,  # records the character span of every {% generation %} block
            **self.processor.tokenizer.special_tokens_map,
        )
        segments, start = [], 0
        for begin, end in spans:
            segments += [(chat[start:begin], False), (chat[begin:end], True)]
            start = end
        segments.append((chat[start:], False))
        return [(text, is_answer) for text, is_answer in segments if text]

    def pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest row (rounded up to pad_to_multiple_of): (B, L) tensors."""
        length = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(lab)] = torch.tensor(lab)
            attention_mask[b, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        total = sum(self.skipped.values())
        if total <= 5 or total % 100 == 0:  # say it early, then now and then, never per sample forever
            logger.warning(f"Skipped a training example ({reason}); skipped so far: {dict(self.skipped)}")
        return None
