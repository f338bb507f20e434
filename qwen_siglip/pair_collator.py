"""Batches of preference pairs for DPOTrainer: the prompt once per row, the completion marked exactly as SFT labels it.

    {"prompt": [...], "chosen": [...], "rejected": [...], "images": [PIL]}  x B
      -> input_ids, attention_mask, completion_mask (2B, L): the B chosen rows, then the B rejected rows
         pixel_values (2 n_images, 3, H, W): the pair's images for its chosen row, and the same tensors again

Notable:
- The completion is found from the message structure, as collator.py finds SFT's labels: the chat is cut at the
  template's `{% generation %}` spans and every segment is tokenized on its own. The prompt ends with
  `<|im_start|>assistant\\n` (where generate() starts); the completion is the answer's tokens plus `<|im_end|>`, the
  tokens stage 2 trained on, and not the newline the template writes after it.
- Chosen and rejected share one tokenization of the prompt and the very same pixel tensors, so they see the same
  image features; only the completions differ.
- Truncation never cuts an image or the prompt: a pair is shortened in its completions only; if the prompt alone
  fills `max_length` the pair is skipped and counted (`too_long_image_would_be_cut` if an image reaches past it,
  else `no_assistant_tokens_left`), as SFT's collator counts.
- The trainer masks image tokens and padding out of the completion again (trainer.QwenSiglipDPOTrainer): the
  log-probabilities never cover them, whatever a batch says.
"""

import logging

import torch

from qwen_siglip.collator import IGNORE_INDEX, VLMCollator

logger = logging.getLogger(__name__)


class PairCollator(VLMCollator):
    """Collate preference pairs for `DPOTrainer(data_collator=...)`; skips, padding and spares are VLMCollator's."""

    def __call__(self, examples: list[dict | None]) -> dict[str, torch.Tensor]:
        pairs = self.usable_rows(self.encode_pair, examples)
        # VLMCollator.pad right-pads (ids, labels) rows; a label that is not IGNORE_INDEX marks a completion token.
        batch = self.pad([pair[0] for pair in pairs] + [pair[1] for pair in pairs])
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        pixels = [p for pair in pairs for p in pair[2]]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels + pixels)  # chosen rows' images, then the rejected rows'
        return batch

    def encode_pair(self, example: dict | None) -> tuple[tuple, tuple, list[torch.Tensor]] | None:
        """((chosen ids, labels), (rejected ids, labels), pixel values) of one pair, truncated safely; None if
        unusable (counted). Labels are the token ids on the completion and IGNORE_INDEX on the prompt."""
        if example is None or example.get("prompt") is None:  # data.to_hf() gives all-None fields
            return self._skip("undecodable_image")
        prompt, chosen = self.split(example["prompt"] + example["chosen"])
        _, rejected = self.split(example["prompt"] + example["rejected"])
        try:  # one call: the processor expands each image placeholder and checks them against the images
            enc = self.processor(text=[*prompt, chosen, rejected], images=example["images"] or None)
        except ValueError as err:
            logger.warning(f"Bad example: {err}")
            return self._skip("placeholder_image_mismatch")
        prompt_ids = [t for segment in enc["input_ids"][: len(prompt)] for t in segment]
        completions = enc["input_ids"][len(prompt) :]  # [chosen ids, rejected ids]
        room = max(map(len, completions)) if self.max_length is None else self.max_length - len(prompt_ids)
        if room <= 0:
            last_image_end = max((i for i, t in enumerate(prompt_ids) if t == self.vision_end), default=-1)
            cut = last_image_end >= self.max_length
            return self._skip("too_long_image_would_be_cut" if cut else "no_assistant_tokens_left")
        pixels = [torch.as_tensor(p) for p in enc.get("pixel_values", [])]  # (3, H, W) each, in order
        rows = [(prompt_ids + c[:room], [IGNORE_INDEX] * len(prompt_ids) + c[:room]) for c in completions]
        return rows[0], rows[1], pixels

    def split(self, messages: list[dict]) -> tuple[list[str], str]:
        """(prompt segments, completion) of a chat whose last turn is the completion: the rendered chat cut at the
        template's `{% generation %}` spans (collator.py); the completion is the last answer and its `<|im_end|>`,
        without the newline after it."""
        segments = self.segments(messages)
        last = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
        return [text for text, _ in segments[:last]], segments[last][0]
