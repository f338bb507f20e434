"""Batch collation for training: chat messages + images -> input_ids, attention_mask, pixel_values, labels.

Notable:
- Labels are built here, not in the model: during training TRL replaces the model's forward with a fused LM head
  that never sees our top-level forward. Only assistant tokens are targets (every assistant turn of a multi-turn
  chat, its closing `<|im_end|>` included). System and user text, image tokens and padding are -100.
- Assistant spans are found in token space (`<|im_start|>assistant\\n` ... `<|im_end|>`), so they are exact whatever
  the tokenizer merges around them.
- Truncation never cuts through an image: an over-long sample loses only text after its last image; if even that
  is not enough, or nothing trainable is left, the sample is skipped and counted.
- `None` examples (images that failed to decode in the dataset) are dropped and counted too. A batch whose examples
  all fail is replaced by the last good example (counted as `batch_replaced`), so a non-strict run never dies on data.
"""

import logging
from collections import Counter

import torch

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


class VLMCollator:
    """Collate `{"messages": [...], "images": [PIL, ...]}` examples for `SFTTrainer(data_collator=...)`."""

    def __init__(self, processor, max_length: int | None = 1024, pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)  # opens an assistant turn
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self.vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
        self.skipped: Counter = Counter()

    strict = False  # training.main sets it from --strict: an all-bad batch raises instead of being replaced
    spare: tuple | None = None  # the last good row, to stand in for a later batch whose examples all fail

    def __call__(self, examples: list[dict | None]) -> dict[str, torch.Tensor]:
        rows = [row for row in map(self.encode, examples) if row is not None]
        if not rows:
            rows = self._replacement_rows()
        else:
            self.spare = rows[0]
        batch = self.pad([row[:2] for row in rows])
        pixels = [p for row in rows for p in row[2]]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)  # (n_images, 3, H, W), in order of appearance
        return batch

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
        text = self.processor.apply_chat_template(example["messages"])
        try:  # the processor expands each image placeholder and checks placeholders against images
            enc = self.processor(text=text, images=example["images"] or None, return_tensors="pt")
        except ValueError as err:
            logger.warning(f"Bad example: {err}")
            return self._skip("placeholder_image_mismatch")
        ids = enc["input_ids"][0].tolist()
        labels = self.assistant_labels(ids)
        if self.max_length is not None and len(ids) > self.max_length:
            last_image_end = max((i for i, t in enumerate(ids) if t == self.vision_end), default=-1)
            if last_image_end >= self.max_length:
                return self._skip("too_long_image_would_be_cut")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return self._skip("no_assistant_tokens_left")
        return ids, labels, list(enc.get("pixel_values", []))

    def assistant_labels(self, ids: list[int]) -> list[int]:
        """Copy ids inside assistant turns (after the header, through `<|im_end|>`); everything else -100."""
        labels = [IGNORE_INDEX] * len(ids)
        n, i = len(self.header), 0
        while i < len(ids):
            if ids[i : i + n] == self.header:
                i += n
                while i < len(ids):
                    labels[i] = ids[i]
                    i += 1
                    if ids[i - 1] == self.im_end:
                        break
            else:
                i += 1
        return labels

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
