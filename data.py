"""Every dataset format our users hold -> TRL's conversational vision format, for training and evaluation.

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": [PIL.Image in RGB]}          # one image per {"type": "image"} item, in order of appearance

Formats, recognised per record from its keys:
    llava     {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nDescribe..."}, ...]}
    role/text {"image": "a.jpg, b.jpg", "conversations": [{"role": "user", "content": "..<image>..<image>"}, ...]}
    captions  {"image_id": "x.jpg", "caption": ["cap 1", "cap 2"]}  (AI Challenger) -> ONE Q&A per record
    trl       {"messages": [...], "images": [...]}, content typed or a string with <image>
    vqa       {"image": ..., "question": "...", "answer": "..." | "answers": [...]}  (benchmarks: POPE, MME, TextVQA)
Sources: a .json/.jsonl/.parquet file, a folder of them (not recursive), a `save_to_disk` folder, or a Hub id.
An image is a path (relative to image_root, default the data file's folder), HF's {"bytes", "path"} or raw bytes.

Notable:
- Records are checked at load time (roles, empty turns, <image> count vs images, image header) and bad ones are
  skipped, counted by reason and reported in ONE warning; strict=True raises on the first one instead.
- Images are decoded lazily, per example, and made RGB with care: alpha on white, 16-bit rescaled, not clipped.
- Image paths are confined to image_root (symlinks resolved); huge images are refused from their header alone.
- A decode that still fails in __getitem__ (truncated file) returns None (all-None fields through to_hf()): THE
  COLLATOR MUST DROP THEM (VLMCollator does, counting them). With DataLoader workers such failures are counted in
  the worker, not in `ds.skipped`.
- Pitfall: TRL 1.16's SFTTrainer rejects anything that is not a `datasets` object, so pass `ds.to_hf()` to it.
"""

import io
import json
import logging
import re
import warnings
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from tqdm.auto import tqdm

from processing_qwen_siglip import LLAVA_PLACEHOLDER_RE

log = logging.getLogger(__name__)

IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
MAX_PIXELS = 64_000_000  # refused from the header; PIL's own bomb limit (Image.MAX_IMAGE_PIXELS) applies as well
CAPTION_PROMPTS = {
    "en": ["Describe this image.", "What is in this picture?", "Write a short caption for this image."],
    "zh": ["描述这张图片。", "这张图片里有什么？", "请用一句话描述这张图片。"],
}
CJK = re.compile(r"[\u4e00-\u9fff]")


class BadRecord(ValueError):
    """A record we refuse to train on; `reason` is the key it is counted under."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"field '{field}': {detail}")
        self.reason = reason


# ----------------------------------------------------------------------------- records -> messages


def split_placeholders(text: str) -> list[dict]:
    """'<image>\\nWhat is this?' -> [{'type': 'image'}, {'type': 'text', 'text': 'What is this?'}].

    Splits on the processor's own rule (the newline right after `<image>` belongs to it), so a raw inference prompt
    "<image>\\nWhat is this?" tokenizes exactly as this record does after the chat template.
    """
    pieces = LLAVA_PLACEHOLDER_RE.split(text)
    content = []
    for k, piece in enumerate(pieces):
        if k > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def _typed_item(item: Any, field: str) -> dict:
    kind = item.get("type") if isinstance(item, dict) else None
    if kind == "image":  # arrow gives image items a "text": None column too: drop it
        return {"type": "image"}
    if kind == "text" and isinstance(item.get("text"), str):
        return {"type": "text", "text": item["text"]}
    raise BadRecord("malformed_record", field, f"bad content item {str(item)[:60]}")


def _turn(turn: Any, field: str) -> dict:
    if not isinstance(turn, dict):
        raise BadRecord("malformed_record", field, "a turn must be an object")
    role = turn.get("role") or turn.get("from")  # role/content or LLaVA's from/value
    text = turn.get("content") if "content" in turn else turn.get("value")
    role = ROLES.get(role.lower()) if isinstance(role, str) else None
    if role is None:
        raise BadRecord("unknown_role", field, f"unknown role {turn.get('role') or turn.get('from')!r}")
    if isinstance(text, str):
        return {"role": role, "content": split_placeholders(text)}
    if isinstance(text, list):
        return {"role": role, "content": [_typed_item(item, field) for item in text]}
    raise BadRecord("malformed_record", field, f"content is {type(text).__name__}, not text")


def _image_refs(value: Any) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str):  # minimind-v: "a.jpg, b.jpg". Pitfall: a file name holding a comma is split too
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _image_refs(v)]
    return [value]  # {"bytes", "path"} dict, raw bytes or a PIL image


def _caption_turns(rec: dict, index: int) -> list[dict]:
    """Captions -> one user/assistant pair; caption and prompt picked from the record index (reproducible)."""
    captions = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise BadRecord("empty_turn", "caption", "no non-empty caption")
    caption = captions[index % len(captions)]
    prompts = CAPTION_PROMPTS["zh" if CJK.search(caption) else "en"]  # ask in the language of the answer
    prompt = prompts[index % len(prompts)]
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]


def _vqa_turns(rec: dict) -> list[dict]:
    """Benchmark-style question/answer -> one user/assistant pair (several answers: the most common, as VQA scores)."""
    answers = rec.get("answers") if rec.get("answer") is None else [rec["answer"]]
    if isinstance(answers, dict):  # a Hub list of structs arrives as a struct of lists: {"answer": [...]}
        answers = answers.get("answer")
    answers = [a["answer"] if isinstance(a, dict) else a for a in answers or []]  # VQAv2: [{"answer": ...}]
    answers = [str(a).strip() for a in answers if str(a).strip()]
    question = rec["question"] if isinstance(rec["question"], str) else ""
    if not answers or not question.strip():
        raise BadRecord("empty_turn", "question" if answers else "answer", "empty question or answer")
    answer = Counter(answers).most_common(1)[0][0]
    user = split_placeholders(question)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def normalize(rec: Any, index: int) -> tuple[list[dict], list, str]:
    """One raw record -> (messages, image references, name of the image field). Raises BadRecord."""
    if not isinstance(rec, dict):
        raise BadRecord("malformed_record", "record", f"not a JSON object: {str(rec)[:60]!r}")
    field = next((k for k in ("images", "image", "image_id") if rec.get(k) is not None), "image")
    refs = _image_refs(rec.get(field))
    if "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        if not isinstance(rec[key], list):
            raise BadRecord("malformed_record", key, "must be a list of turns")
        messages = [_turn(turn, f"{key}[{j}]") for j, turn in enumerate(rec[key])]
    elif "caption" in rec:
        key, messages = "caption", _caption_turns(rec, index)
    elif "question" in rec:
        key, messages = "question", _vqa_turns(rec)
    else:
        detail = f"no conversations/messages/caption/question in keys {sorted(rec)}"
        raise BadRecord("malformed_record", "record", detail)
    _check_turns(messages, refs, key, field)
    return messages, refs, field


def _check_turns(messages: list[dict], refs: list, key: str, field: str) -> None:
    placeholders = sum(item["type"] == "image" for m in messages for item in m["content"])
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if placeholders == 0 and len(refs) == 1 and first_user is not None:
        first_user["content"].insert(0, {"type": "image"})  # LLaVA convention: the image goes before the question
        placeholders = 1
    answered = False  # an assistant turn with text: without one there is nothing to learn
    for j, m in enumerate(messages):
        has_text = any(item["type"] == "text" and item["text"].strip() for item in m["content"])
        if not has_text and not any(item["type"] == "image" for item in m["content"]):
            raise BadRecord("empty_turn", f"{key}[{j}]", f"empty {m['role']} turn")
        answered = answered or (m["role"] == "assistant" and has_text)
    if not answered:
        raise BadRecord("no_assistant_turn", key, "no assistant turn with text")
    if placeholders != len(refs):
        detail = f"{placeholders} <image> placeholders but {len(refs)} images"
        raise BadRecord("placeholder_image_mismatch", field, detail)


# ----------------------------------------------------------------------------- images


def _open(ref: Any, root: Path | None, field: str, max_pixels: int) -> Image.Image:
    """Open an image lazily (header only) from inside `root`; refuse bombs before any pixel is decoded."""
    if isinstance(ref, Image.Image):
        src = ref
    elif isinstance(ref, dict) and ref.get("bytes"):  # HF Image feature storage
        src = io.BytesIO(ref["bytes"])
    elif isinstance(ref, (bytes, bytearray)):
        src = io.BytesIO(ref)
    else:
        src = _resolve(ref.get("path") if isinstance(ref, dict) else ref, root, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below 2x its limit
            im = src.copy() if isinstance(src, Image.Image) else Image.open(src)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRecord("decompression_bomb", field, str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise BadRecord("undecodable_image", field, f"cannot open image: {e}") from None
    if im.width * im.height > max_pixels:
        im.close()
        raise BadRecord("decompression_bomb", field, f"{im.width}x{im.height} is over {max_pixels} pixels")
    return im


def _resolve(rel: Any, root: Path | None, field: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise BadRecord("malformed_record", field, f"unusable image reference {str(rel)[:60]!r}")
    if root is None:
        raise BadRecord("missing_image", field, f"file '{rel}' given but no image_root")
    path = (root / rel).resolve()  # absolute `rel` replaces root; resolve() follows symlinks, so all escapes show
    if not path.is_relative_to(root):
        raise BadRecord("image_outside_root", field, f"file '{rel}' is outside the image root")
    if not path.is_file():
        raise BadRecord("missing_image", field, f"file '{rel}' not found under image root")
    return path


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> a new RGB image (so the source file can be closed)."""
    if im.mode.startswith("I"):  # 16/32-bit grey: convert("L") would clip everything above 255 to white
        full = 65535 if im.mode.startswith("I;16") else None
        im = im.convert("I")
        hi = im.getextrema()[1]
        full = full or (255 if hi <= 255 else 65535 if hi <= 65535 else hi)  # mode I: guess the range from the data
        return im.point(lambda v: v * (255 / full)).convert("L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # plain convert("RGB") drops alpha and shows whatever hides under transparent pixels, often black
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")  # P, L, 1, CMYK, YCbCr, RGB


# ----------------------------------------------------------------------------- sources


class _RawRows:
    """A datasets.Dataset read as plain rows: through its Image feature every access would decode the image."""

    def __init__(self, ds: datasets.Dataset):
        self.table = ds.with_format("arrow")

    def __getitem__(self, i: int) -> dict:
        return self.table[i].to_pylist()[0]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.iter(batch_size=256):
            yield from batch.to_pylist()


@dataclass
class Source:
    name: str  # shown in reports and errors
    records: Iterable  # list of raw records or _RawRows (indexable), or a datasets.IterableDataset (streaming)
    root: Path | None  # image root, resolved


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return line  # counted as malformed_record instead of failing the whole file


def read_file(path: Path) -> list | _RawRows:
    """Local files are read whole even with streaming=True (text only; images stay lazy)."""
    if path.suffix == ".parquet":
        return _RawRows(datasets.Dataset.from_parquet(str(path)))
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            return [_json_line(line) for line in f if line.strip()]
        data = json.load(f)
    return data if isinstance(data, list) else [data]


def find_sources(source: str, image_root: str | None, split: str, streaming: bool) -> list[Source]:
    path = Path(source)
    root = Path(image_root).resolve() if image_root else None
    if root and not root.is_dir():
        raise FileNotFoundError(f"image_root {image_root} is not a folder")
    if source.endswith(DATA_SUFFIXES) and not path.is_file():  # a typo, not a Hub id: say so plainly
        raise FileNotFoundError(f"data file {source} not found")
    if path.is_file():
        return [Source(path.name, read_file(path), root or path.parent.resolve())]
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))  # a save_to_disk folder: its json files are metadata, not data
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return [Source(path.name, _RawRows(ds), root or path.resolve())]
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES) if path.is_dir() else []
    if files:
        return [Source(f.name, read_file(f), root or path.resolve()) for f in files]
    # a Hub id (or a folder in Hub layout, e.g. data/train-*.parquet)
    ds = datasets.load_dataset(source, split=split, streaming=streaming)
    rows = ds.decode(False) if streaming else _RawRows(ds)
    return [Source(source, rows, root or (path.resolve() if path.is_dir() else None))]


# ----------------------------------------------------------------------------- datasets


class _Records:
    """What the map-style and streaming datasets share: checking records, decoding, counting the bad ones."""

    streaming = False

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
        self.skipped: Counter[str] = Counter()  # reason -> number of records skipped
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
            messages, refs, field = normalize(rec, index)
            for k, ref in enumerate(refs):
                _open(ref, source.root, field if len(refs) == 1 else f"{field}[{k}]", self.max_pixels).close()
            return messages, refs, field
        except BadRecord as err:
            self._bad(source, index, err)

    def _example(self, source: Source, index: int, messages: list, refs: list, field: str) -> dict | None:
        try:
            images = []
            for k, ref in enumerate(refs):
                with _open(ref, source.root, field if len(refs) == 1 else f"{field}[{k}]", self.max_pixels) as im:
                    images.append(to_rgb(im))
        except (OSError, SyntaxError, ValueError) as e:  # a header that opened but pixels that do not
            err = e if isinstance(e, BadRecord) else BadRecord("undecodable_image", field, f"cannot decode: {e}")
            self._bad(source, index, err)
            return None
        return {"messages": messages, "images": images}

    def summary(self) -> str:
        skipped = ", ".join(f"{reason}={n}" for reason, n in self.skipped.most_common()) or "none"
        kept = f"kept {len(self)}, " if hasattr(self, "__len__") else ""
        return f"{kept}skipped {sum(self.skipped.values())} ({skipped})"

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
        source, i = self.sources[self._source[idx]], self._row[idx]
        return self._example(source, i, *normalize(source.records[i], i))

    def to_hf(self) -> datasets.Dataset:
        """The same examples as a `datasets.Dataset`, for SFTTrainer; a failed decode comes as all-None fields."""
        return datasets.Dataset.from_dict({"index": list(range(len(self)))}).with_transform(self._hf_batch)

    def _hf_batch(self, batch: dict) -> dict:
        examples = [self[i] for i in batch["index"]]
        return {key: [ex and ex[key] for ex in examples] for key in ("messages", "images")}


class IterableVLMDataset(_Records, torch.utils.data.IterableDataset):
    """Streaming: normalises and checks record by record; counts restart with each pass over the data."""

    streaming = True

    def __iter__(self) -> Iterator[dict]:
        self.skipped.clear()
        self.offenders.clear()
        worker = torch.utils.data.get_worker_info()
        n_kept = 0
        for n, (s, i, rec) in enumerate(self._records()):
            if worker is not None and n % worker.num_workers != worker.id:
                continue  # each DataLoader worker takes its share, or every worker would yield everything
            if self.limit is not None and n_kept >= self.limit:  # pitfall: the limit is per worker
                break
            checked = self._check(self.sources[s], i, rec)
            example = checked and self._example(self.sources[s], i, *checked)
            if example is not None:
                n_kept += 1
                yield example
        self._report()

    def to_hf(self) -> datasets.IterableDataset:
        """The same stream as a `datasets.IterableDataset`, for SFTTrainer (which then needs max_steps)."""
        return datasets.IterableDataset.from_generator(self.__iter__)


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
