"""Training and evaluation datasets over any supported source: records checked at load, images decoded per example.

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": [PIL.Image in RGB]}          # one image per {"type": "image"} item, in order of appearance

Formats: `records.py`; sources: `sources.py`; the image opener: `images.py`.

Notable:
- Records are checked at load time (roles, empty turns, <image> count vs images, image header) and bad ones are
  skipped, counted by reason and reported in ONE warning; strict=True raises on the first one instead. Every
  message names the file, the record index, the record's own field (`images[1]`, `image`, `image_id`) and the reason.
- Image paths are confined to the image root (symlinks resolved) and stat-ed, never opened, before use.
- Images are decoded lazily, per example. A decode that still fails (a truncated file whose header is whole) makes
  `ds[i]` None, counted once in `late_skipped` however often the record is met, and remembered: it is never decoded
  again. In training (`to_hf()`) a good example drawn at random (seeded by the index: the same after a resume)
  stands in, so batches are never empty, a non-strict run never dies on data, and the stand-ins are spread over
  the good records. Strict raises at that record. With DataLoader workers these late failures are counted and
  remembered in each worker's copy, not in the main process's.
- `require_usable` refuses a dataset with no usable record (all skipped, an empty file, a stream that yields
  nothing) with one message: how many were skipped, why, and the first offenders. Training calls it before the
  trainer is built (TRL would otherwise die on `next(iter(...))` with a bare StopIteration).
- Pitfall: TRL 1.16's SFTTrainer rejects anything that is not a `datasets` object, so pass `ds.to_hf()` to it.
"""

import logging
import os
import random
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from tqdm.auto import tqdm

from qwen_siglip.images import MAX_PIXELS, ImageRefused, check_file, decode_opened, open_header, shorten, why
from qwen_siglip.records import BadRecord, normalize
from qwen_siglip.sources import Source, find_sources

log = logging.getLogger(__name__)

REPLACE_TRIES = 16  # training draws up to this many stand-ins for an undecodable example


class NoUsableRecords(ValueError):
    """A data source of which no record can be used: nothing to train or evaluate on."""


# ----------------------------------------------------------------------------- a record's images, under its root


def _image_src(ref: Any, root: Path | None, field: str) -> tuple[Any, str]:
    """A record's image reference -> (what load_rgb/open_header take, how messages name it). Raises BadRecord."""
    if isinstance(ref, dict) and not ref.get("bytes"):  # HF's {"bytes": None, "path": ...}: a file after all
        ref = ref.get("path")
    if isinstance(ref, (str, os.PathLike)):
        return _resolve(os.fspath(ref), root, field), f"file {shorten(os.fspath(ref))}"
    if isinstance(ref, (bytes, bytearray, dict, Image.Image)):
        return ref, f"image of {shorten(ref.get('bytes') if isinstance(ref, dict) else ref)}"
    raise BadRecord("malformed_record", field, f"unusable image reference {shorten(ref)}")


def _resolve(rel: str, root: Path | None, field: str) -> Path:
    """`rel` under `root`, checked: confined to root (symlinks resolved), a regular file. Raises BadRecord."""
    shown = f"file {shorten(rel)}"
    if rel.startswith(("http://", "https://")):
        raise BadRecord("image_url", field, f"{shown} is a URL: training does not download images (fetch them "
                        "first and give paths under image_root)")  # fmt: skip
    if root is None:
        raise BadRecord("missing_image", field, f"{shown} given but no image_root")
    try:
        path = (root / rel).resolve()  # absolute `rel` replaces root; resolve() follows symlinks: all escapes show
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte ("embedded null byte"), a symlink loop (<3.13)
        detail = "the path holds a NUL byte" if "\0" in rel else f"unusable path ({why(e)})"
        raise BadRecord("bad_path", field, f"{shown}: {detail}") from None
    if not path.is_relative_to(root):
        raise BadRecord("image_outside_root", field, f"{shown} is outside the image root")
    try:
        return check_file(path, shown)
    except ImageRefused as e:
        where = " under image root" if e.reason == "missing_image" else ""
        raise BadRecord(e.reason, field, f"{e}{where}") from None


def _probe(ref: Any, root: Path | None, field: str, max_pixels: int) -> None:
    """Load-time check, cheap: the file is there and its header is an image of acceptable size."""
    src, shown = _image_src(ref, root, field)
    try:
        im, _, owned = open_header(src, max_pixels=max_pixels, name=shown)
    except ImageRefused as e:
        raise BadRecord(e.reason, field, str(e)) from None
    if owned:
        im.close()


def _decode(ref: Any, root: Path | None, field: str, max_pixels: int) -> Image.Image:
    """Per-example decode through the one image opener, load_rgb. Raises BadRecord."""
    src, shown = _image_src(ref, root, field)
    try:
        return decode_opened(*open_header(src, max_pixels=max_pixels, name=shown))
    except ImageRefused as e:
        raise BadRecord(e.reason, field, str(e)) from None


# ----------------------------------------------------------------------------- datasets


class _Records:
    """What the map-style and streaming datasets share: checking records, decoding, counting the bad ones."""

    streaming = False
    # A raw record -> (messages, image references, their fields); preferences.py reads other records through it.
    normalize = staticmethod(normalize)

    def __init__(
        self,
        source: str,
        image_root: str | None = None,
        *,
        split: str = "train",
        strict: bool = False,
        limit: int | None = None,
        max_pixels: int = MAX_PIXELS,
    ):
        self.recipe = (source, image_root, split, self.streaming)
        self.sources = find_sources(*self.recipe)
        self.strict, self.limit, self.max_pixels = strict, limit, max_pixels
        self.skipped: Counter[str] = Counter()  # reason -> number of records skipped at load time
        self.late_skipped: Counter[str] = Counter()  # the same, for records whose images failed to decode later
        self.failed: dict[tuple[int, int], str] = {}  # (source, record) -> reason: failed to decode, never retried
        self.replaced = 0  # times a good example stood in for a failed one (training)
        self.offenders: list[str] = []  # the first few, as "file record i: field ...: detail"

    def __getstate__(self) -> dict:
        # Pickled for spawned DataLoader workers and hashed by `datasets` in to_hf(): send the recipe, not 595K
        # records, and read the files again on arrival. Pitfall: they must not change in between.
        return {**self.__dict__, "sources": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.sources = find_sources(*self.recipe)

    def _records(self) -> Iterator[tuple[int, int, Any]]:
        """(source number, record index within its source, raw record), over all sources."""
        for s, source in enumerate(self.sources):
            yield from ((s, i, rec) for i, rec in enumerate(source.records))

    def _bad(self, source: Source, index: int, err: BadRecord) -> None:
        msg = f"{source.name} record {index}: {err} [{err.reason}]"
        if self.strict:
            raise ValueError(msg) from err
        self.skipped[err.reason] += 1
        if len(self.offenders) < 5:
            self.offenders.append(msg)

    def _check(self, source: Source, index: int, rec: Any) -> tuple | None:
        """Load-time check, cheap: normalise and open each image's header. None if the record is bad."""
        try:
            messages, refs, fields = self.normalize(rec, index)
            for ref, field in zip(refs, fields):
                _probe(ref, source.root, field, self.max_pixels)
            return messages, refs, fields
        except BadRecord as err:
            self._bad(source, index, err)

    def _example(self, s: int, index: int, messages: list, refs: list, fields: list) -> dict | None:
        """Decode the images of record `index` of source `s`. None if one fails (a whole header over cut pixel data):
        the record is counted in `late_skipped` and remembered in `failed`, so it is never decoded again."""
        source = self.sources[s]
        try:
            images = [_decode(ref, source.root, field, self.max_pixels) for ref, field in zip(refs, fields)]
        except BadRecord as err:
            msg = f"{source.name} record {index}: {err} [{err.reason}]"
            if self.strict:
                raise ValueError(msg) from None
            self.failed[(s, index)] = err.reason
            self.late_skipped[err.reason] += 1
            if len(self.offenders) < 5:
                self.offenders.append(msg)
            total = sum(self.late_skipped.values())
            if total <= 5 or total % 100 == 0:  # say it early, then now and then: never once per image forever
                log.warning("VLM data: skipped while training (%d so far): %s", total, msg)
            return None
        return {"messages": messages, "images": images}

    def summary(self) -> str:
        skipped = ", ".join(f"{reason}={n}" for reason, n in self.skipped.most_common()) or "none"
        kept = f"kept {len(self)}, " if hasattr(self, "__len__") else ""
        return f"{kept}skipped {sum(self.skipped.values())} ({skipped})"

    def late_summary(self) -> str:
        """Records whose images failed to decode after the load, each counted once however often it was drawn, and
        how many good examples stood in for them."""
        n = sum(self.late_skipped.values())
        return f"{dict(self.late_skipped)} (distinct records: {n}; stand-ins: {self.replaced})"

    def no_usable_message(self) -> str:
        """Why nothing is usable: counts by reason and the first offenders, or that there were no records at all."""
        name = self.recipe[0] + (" (streamed)" if self.streaming else "")
        total = sum(self.skipped.values()) + sum(self.late_skipped.values())
        if not total:
            return f"no usable records in {name}: it holds no records"
        reasons = ", ".join(f"{r}={n}" for r, n in (self.skipped + self.late_skipped).most_common())
        first = "\n  ".join(self.offenders)
        return f"no usable records in {name}: {total} skipped ({reasons}); first offenders:\n  {first}"

    def _report(self) -> None:
        if self.skipped:  # ONE warning for the whole load, not one per record
            log.warning("VLM data: %s; first offenders:\n  %s", self.summary(), "\n  ".join(self.offenders))


class VLMDataset(_Records, torch.utils.data.Dataset):
    """Map-style. Keeps the raw records and the indices of the good ones; normalises again per item (cheap)."""

    def __init__(self, source: str, image_root: str | None = None, **options):
        super().__init__(source, image_root, **options)
        self._source, self._row = array("q"), array("q")  # compact: 595K python tuples would cost ~50 MB
        # Checking opens every image header: minutes for 595K records, so show progress.
        for s, i, rec in tqdm(self._records(), desc=f"checking {source}", unit=" records", mininterval=2):
            if self.limit is not None and len(self._row) >= self.limit:
                break
            if self._check(self.sources[s], i, rec) is not None:
                self._source.append(s)
                self._row.append(i)
        self._report()

    def __len__(self) -> int:
        return len(self._row)

    def __getitem__(self, idx: int) -> dict | None:
        s, i = self._source[idx], self._row[idx]
        if (s, i) in self.failed:  # failed to decode before: not tried again, not counted again
            return None
        return self._example(s, i, *self.normalize(self.sources[s].records[i], i))

    def messages(self, idx: int) -> list[dict]:
        """The chat messages of item `idx`, without opening its images (what packing needs for lengths)."""
        source, i = self.sources[self._source[idx]], self._row[idx]
        return self.normalize(source.records[i], i)[0]

    def to_hf(self) -> datasets.Dataset:
        """The same examples as a `datasets.Dataset`, for SFTTrainer. An example whose images fail to decode is
        replaced by a good one drawn at random (`replaced_if_bad`), so a batch is never left empty."""
        return datasets.Dataset.from_dict({"index": list(range(len(self)))}).with_transform(self._hf_batch)

    def _hf_batch(self, batch: dict) -> dict:
        examples = [self.replaced_if_bad(i) for i in batch["index"]]
        return {key: [ex and ex[key] for ex in examples] for key in ("messages", "images")}

    def replaced_if_bad(self, idx: int, tries: int = REPLACE_TRIES) -> dict | None:
        """Example `idx` or, if it fails to decode, a good one drawn at random in its place (counted in `replaced`).

        The draws are seeded by `idx`: the same stand-in after a resume or on any rank, and different failed records
        draw different stand-ins, so no one good example weighs more. A record known to fail is not decoded again;
        every draw counts against `tries`, so what is drawn does not depend on what was already known to fail.
        None (all-None fields in to_hf(), counted by the collator) only if `tries` draws all fail.
        Pitfall: evaluation must not use this: it would score one example twice. It indexes `ds[i]` instead.
        """
        example = self[idx]
        draws = random.Random(idx)
        for _ in range(min(tries, len(self) - 1) if example is None else 0):
            example = self[draws.randrange(len(self))]
            if example is not None:
                self.replaced += 1
                break
        return example


class IterableVLMDataset(_Records, torch.utils.data.IterableDataset):
    """Streaming: normalises and checks record by record; counts restart with each pass over the data."""

    streaming = True

    def __iter__(self) -> Iterator[dict]:
        self.skipped.clear()  # per pass; `failed` is kept: a record that failed to decode is not decoded again
        self.late_skipped.clear()
        self.offenders.clear()
        worker = torch.utils.data.get_worker_info()
        n_kept = 0
        for n, (s, i, rec) in enumerate(self._records()):
            if worker is not None and n % worker.num_workers != worker.id:
                continue  # each DataLoader worker takes its share, or every worker would yield everything
            if self.limit is not None and n_kept >= self.limit:  # pitfall: the limit is per worker
                break
            if (s, i) in self.failed:  # failed to decode in an earlier pass: counted in this one, not decoded
                self.late_skipped[self.failed[(s, i)]] += 1
                continue
            checked = self._check(self.sources[s], i, rec)
            example = checked and self._example(s, i, *checked)
            if example is not None:
                n_kept += 1
                yield example
        self._report()

    def to_hf(self) -> datasets.IterableDataset:
        """The same stream as a `datasets.IterableDataset`, for SFTTrainer (which then needs max_steps)."""
        return datasets.IterableDataset.from_generator(self.__iter__)


def require_usable(dataset: VLMDataset | IterableVLMDataset) -> None:
    """Raise NoUsableRecords if `dataset` has no usable example: all skipped, an empty file, an empty stream.

    A stream is read up to its first good example (decoded) to know; the counts of that read are in the message.
    Call it before a trainer is built: TRL's SFTTrainer reads the first example and dies on an empty dataset with a
    bare StopIteration.
    """
    empty = len(dataset) == 0 if isinstance(dataset, VLMDataset) else next(iter(dataset), None) is None
    if empty:
        raise NoUsableRecords(dataset.no_usable_message())


def load_vlm_dataset(
    source: str,
    image_root: str | None = None,
    *,
    split: str = "train",
    streaming: bool = False,
    strict: bool = False,
    limit: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> VLMDataset | IterableVLMDataset:
    """Load any supported format as TRL conversational examples; see the module docstring.

    `limit` keeps the first `limit` good examples (handy for smoke runs). `max_pixels` refuses larger images.
    """
    cls = IterableVLMDataset if streaming else VLMDataset
    return cls(source, image_root, split=split, strict=strict, limit=limit, max_pixels=max_pixels)
