"""Padding-free and packed multimodal batches, and length-grouped padded batches, for the trainer.

    --padding_free true     a micro-batch's samples lie end to end in ONE row: no padding at all
    --packing true          micro-batches are filled with whole samples up to a token budget (best-fit decreasing),
                            laid out padding-free; `per_device_train_batch_size` then counts rows of `max_length`
    --group_by_length true  padded batches of samples of similar length (LLaVA's / transformers' length grouping)

Notable:
- Attention never crosses samples: `position_ids` restart at 0 for every sample and there is no attention mask, so
  transformers' `find_packed_sequence_indices` builds a block-diagonal causal mask (sdpa, eager) and flash attention
  takes its varlen path (which needs exactly one row: hence one row). Any other attention implementation would
  attend across samples and is refused (`check_attention`).
- No target crosses a sample boundary: the loss shifts labels left by one, so sample k+1's first label would be the
  target of sample k's last token. Each sample's first label is made -100; in a padded batch the shift drops every
  row's first label anyway, so the targets, `num_items_in_batch` and the loss are those of the padded batch.
- `use_cache=False` travels in the batch: with a cache, transformers skips the packed-sequence detection.
- Image features merge in order: pixel values are stacked in order of appearance along the row, as padded.
- Lengths without decoding an image (`cheap_lengths`): the chat template's text, tokenized in batches, plus
  `num_image_tokens` per image (an estimate: the collator's own tokenization may differ by a token at a boundary).
- The samplers are batch samplers, deterministic given (seed, epoch): resume after SIGKILL skips the very batches
  an unbroken run trained, and every rank computes the same list (accelerate hands each rank its share).
- Pitfall, packing: the packs are made once (seeded); each epoch reshuffles which packs share a micro-batch and in
  which order, so the number of steps per epoch never changes (the Trainer counts it once, up front).
"""

import bisect
import logging
import math
import time

import torch

from qwen_siglip.collator import IGNORE_INDEX, VLMCollator

logger = logging.getLogger(__name__)

# Attention implementations that keep packed samples apart from position_ids alone (checked in tests/test_packing.py
# for eager and sdpa; flash attention's varlen path reads position_ids of a single row). flex_attention gets the same
# mask function in transformers but is not tested here (it compiles, and not on every CPU): refused until it is.
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def check_attention(model) -> None:
    """Refuse an attention implementation that would let packed samples attend to each other."""
    impl = model.config.get_text_config()._attn_implementation
    if impl not in PACKED_ATTENTION:
        raise ValueError(
            f"--padding_free/--packing need an attention implementation that keeps packed samples apart; the language "
            f"model uses {impl!r}, which would attend across samples. Use --attn_implementation with one of "
            f"{list(PACKED_ATTENTION)}, or --group_by_length true for padded batches instead."
        )


class PaddingFreeCollator(VLMCollator):
    """VLMCollator whose batch is one row: samples end to end, `position_ids` restarting at 0, no attention mask.

    Only `pad` differs: encoding, safe truncation and counted skips are VLMCollator's own.
    """

    def pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """(ids, labels) per sample -> (1, total) input_ids, labels and position_ids."""
        input_ids, labels, position_ids = [], [], []
        for ids, lab in rows:
            # The shift in the loss makes this label the target of the previous sample's last token: never a target.
            lab = [IGNORE_INDEX, *lab[1:]]
            input_ids += ids
            labels += lab
            position_ids += range(len(ids))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            # Pitfall: with a cache (the model's default outside TRL's fused head) transformers skips the packed-mask
            # detection and the row attends across samples.
            "use_cache": False,
        }


# ----------------------------------------------------------------------------- lengths


def cheap_lengths(dataset, processor, max_length: int | None = None, chunk: int = 1024) -> list[int]:
    """Tokens per sample (text tokens + `num_image_tokens` per image), capped at max_length; no image decoded."""
    start = time.perf_counter()
    tok, image_id = processor.tokenizer, processor.image_token_id
    extra = processor.num_image_tokens - 1  # the template writes one <|image_pad|> per image; the processor expands it
    lengths = []
    for lo in range(0, len(dataset), chunk):
        chats = [dataset.messages(i) for i in range(lo, min(lo + chunk, len(dataset)))]
        texts = processor.apply_chat_template(chats)  # a list in, a list out: faster than one by one
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            n = len(ids) + extra * ids.count(image_id)
            lengths.append(min(n, max_length) if max_length else n)
    logger.info(f"lengths of {len(lengths):,} samples in {time.perf_counter() - start:.1f}s (no image decoded)")
    return lengths


# ----------------------------------------------------------------------------- packing


def best_fit_decreasing(items: list[tuple[int, int]], capacity: int) -> list[list[int]]:
    """Pack (index, length) items into bins of `capacity` tokens: longest first, each into the fullest bin it fits.

    An item longer than the capacity gets a bin of its own (the collator truncates it safely).
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin number), sorted: bisect finds the tightest fit
    for index, length in sorted(items, key=lambda item: -item[1]):
        k = bisect.bisect_left(free, (length, -1))
        if k == len(free):
            bins.append([index])
            left, b = capacity - length, len(bins) - 1
        else:
            left, b = free.pop(k)
            bins[b].append(index)
            left -= length
        if left > 0:
            bisect.insort(free, (left, b))
    return bins


class PackedBatchSampler:
    """Micro-batches of `rows` packs, each pack whole samples filling up to `capacity` tokens.

    Packs are made once: best-fit decreasing over buffers of `buffer_size` samples of a seeded shuffle (a buffer
    bounds the work and keeps packs a random mix). Each epoch shuffles the packs (seed + epoch) and groups them.
    Every sample is in exactly one pack, so each is trained once per epoch.
    """

    def __init__(self, lengths: list[int], capacity: int, rows: int = 1, seed: int = 0, buffer_size: int = 10_000):
        self.rows, self.seed, self.epoch = rows, seed, 0
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        self.packs = []
        for lo in range(0, len(order), buffer_size):
            self.packs += best_fit_decreasing([(i, lengths[i]) for i in order[lo : lo + buffer_size]], capacity)
        used = sum(lengths[i] for pack in self.packs for i in pack)
        self.fill = used / (capacity * len(self.packs)) if self.packs else 0.0
        logger.info(
            f"packing: {len(lengths):,} samples in {len(self.packs):,} packs of {capacity}, {self.fill:.0%} full"
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        packs = [self.packs[i] for i in torch.randperm(len(self.packs), generator=g).tolist()]
        for lo in range(0, len(packs), self.rows):
            yield [i for pack in packs[lo : lo + self.rows] for i in pack]

    def __len__(self) -> int:
        return math.ceil(len(self.packs) / self.rows)


class LengthGroupedBatchSampler:
    """Padded batches of similar lengths: shuffle, cut into megabatches of `group` batches, sort each by length.

    The batch order is shuffled too (seed + epoch), except that the longest batch goes first: a run that would run
    out of memory does so at step 1.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.group, self.epoch = lengths, batch_size, seed, group, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        mega = self.batch_size * self.group
        batches = []
        for lo in range(0, len(order), mega):
            chunk = sorted(order[lo : lo + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]) * len(batches[b]))
        batches.insert(0, batches.pop(longest))
        yield from batches

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


# ----------------------------------------------------------------------------- choosing collator and sampler


def batching(
    processor,
    model,
    dataset,
    *,
    padding_free: bool = False,
    packing: bool = False,
    group_by_length: bool = False,
    max_length: int | None = None,
    rows: int = 1,
    seed: int = 0,
    strict: bool = False,
):
    """(collator, batch sampler or None) for --padding_free / --packing / --group_by_length (`rows`: the per-device
    batch). TRL refuses the first two for vision data; training switches TRL's own off (`override_trl_args`)."""
    padding_free = padding_free or packing  # a pack is laid out padding-free
    if padding_free and group_by_length:
        raise ValueError("--group_by_length is for padded batches; with --padding_free/--packing there is no padding")
    collator = (PaddingFreeCollator if padding_free else VLMCollator)(processor, max_length=max_length, strict=strict)
    if padding_free:
        check_attention(model)
    if not (packing or group_by_length):
        return collator, None
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            "--packing/--group_by_length need a map-style dataset (their lengths): not --dataset_streaming"
        )
    if packing and not max_length:
        raise ValueError("--packing needs --max_length: the size of a pack")
    lengths = cheap_lengths(dataset, processor, max_length)
    if packing:
        return collator, PackedBatchSampler(lengths, max_length, rows, seed=seed)
    return collator, LengthGroupedBatchSampler(lengths, rows, seed=seed)
