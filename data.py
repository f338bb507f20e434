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
  skipped, counted by reason and reported in ONE warning; strict=True raises on the first one instead. Every
  message names the file, the record index, the record's own field (`images[1]`, `image`, `image_id`) and the reason;
  it never echoes a base64 string or bytes whole (`shorten`). A file that is not JSON or not UTF-8 is an error
  naming the file and line; one bad .jsonl line is a counted skip naming its line.
- ONE image opener, `load_rgb`, for data, evaluation, the app and pipeline inputs we prepare: fully decoded RGB,
  upright (EXIF orientation applied, then dropped), alpha on white, 16-bit rescaled, not clipped.
- Image paths are confined to image_root (symlinks resolved) and stat-ed, never opened, before use: a folder, FIFO or
  device is `not_a_file`, a URL `image_url`, a NUL byte or over-long name `bad_path`. Too many pixels are refused
  from the header alone: `too_many_pixels` over max_pixels, `decompression_bomb` only over PIL's own limit.
- Images are decoded lazily, per example. A decode that still fails (a truncated file whose header is whole) makes
  `ds[i]` None, counted in `late_skipped`; in training (`to_hf()`) the next good example stands in, so batches are
  never empty and a non-strict run never dies on data. Strict raises at that record. With DataLoader workers these
  late failures are counted in each worker's copy, not in the main process's `late_skipped`.
- Pitfall: TRL 1.16's SFTTrainer rejects anything that is not a `datasets` object, so pass `ds.to_hf()` to it.
"""

import errno
import io
import json
import logging
import os
import re
import stat
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

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
MAX_PIXELS = 64_000_000  # refused from the header; PIL's own bomb limit (Image.MAX_IMAGE_PIXELS) applies as well
REPLACE_TRIES = 16  # training replaces an undecodable example by the next of up to this many
CAPTION_PROMPTS = {
    "en": ["Describe this image.", "What is in this picture?", "Write a short caption for this image."],
    "zh": ["描述这张图片。", "这张图片里有什么？", "请用一句话描述这张图片。"],
}
CJK = re.compile(r"[\u4e00-\u9fff]")


class ImageRefused(ValueError):
    """An image we will not use. `reason` is the key it is counted under; str(self) is a message for people."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BadRecord(ImageRefused):
    """A record we refuse to train on: a refusal that also names the record's field."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(reason, f"field '{field}': {detail}")


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


def normalize(rec: Any, index: int) -> tuple[list[dict], list, list[str]]:
    """One raw record -> (messages, image references, the field each reference came from). Raises BadRecord."""
    if isinstance(rec, _BadLine):
        raise BadRecord("malformed_record", "record", f"line {rec.line} is not valid JSON ({rec.error})")
    if not isinstance(rec, dict):
        raise BadRecord("malformed_record", "record", f"not a JSON object: {shorten(str(rec))}")
    # messages must name the record's own key: `images` in TRL's format, `image` in LLaVA's, `image_id` in captions
    default = "images" if "messages" in rec else "image"
    field = next((k for k in ("images", "image", "image_id") if rec.get(k) is not None), default)
    refs = _image_refs(rec.get(field))
    indexed = isinstance(rec.get(field), (list, tuple)) or len(refs) > 1  # `images[1]`; a comma string too
    fields = [f"{field}[{k}]" if indexed else field for k in range(len(refs))]
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
    return messages, refs, fields


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

ORIENTATION = 0x0112  # EXIF tag: how the camera was held; cameras store pixels unrotated
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_QUIET_BOMB_WARNING = ("ignore", None, Image.DecompressionBombWarning, None, 0)


def shorten(value: Any, n: int = 60) -> str:
    """A value fit for a message: bytes as <N bytes>, long text cut, never an object's repr like <_io.BytesIO ...>."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (str, Path)):
        text = str(value)
        return repr(text if len(text) <= n else f"{text[:n]}… ({len(text)} characters)")
    return f"<a {type(value).__name__}>"


def load_rgb(src: Any, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any image source we accept -> a new, fully decoded RGB image, upright (EXIF orientation applied).

    `src`: a path (str or Path), bytes, a binary file object, HF's {"bytes", "path"} dict or a PIL image. Alpha is
    composited on white and 16-bit grey rescaled (`to_rgb`). Too many pixels are refused from the header alone,
    before anything is decoded. Raises ImageRefused; its message names the file by its name only (no folders), bytes
    by their count, and never holds an object's repr.
    """
    return _decode_opened(*open_header(src, max_pixels=max_pixels))


def _decode_opened(im: Image.Image, name: str, owned: bool) -> Image.Image:
    """The second half of load_rgb: decode, make RGB, turn upright; close the file if we opened it."""
    try:
        im.load()
        orientation = im.getexif().get(ORIENTATION)
        rgb = to_rgb(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a whole header over cut or corrupt pixel data
        raise ImageRefused("undecodable_image", f"{name}: cannot decode its pixels ({_why(e)})") from None
    finally:
        if owned:
            im.close()
    if orientation in TRANSPOSE:
        rgb = rgb.transpose(TRANSPOSE[orientation])
    # Pitfall: the EXIF (or XMP) that says "rotate" would be applied a second time by whoever reads it next, e.g.
    # transformers' load_image in pipelines. The pixels are upright now: keep no metadata at all.
    rgb.info.clear()
    return rgb


def open_header(src: Any, *, max_pixels: int = MAX_PIXELS, name: str | None = None) -> tuple[Image.Image, str, bool]:
    """Open lazily (header only) and refuse too many pixels -> (image, name for messages, whether we own it)."""
    _quiet_pil_bomb_warning()
    if isinstance(src, Image.Image):
        im, owned, name = src, False, name or "the image"
    else:
        fp, shown, owned = _image_file(src)
        name = name or shown
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError:  # over twice PIL's limit: it refuses to even report the size
            detail = f"claims over {2 * Image.MAX_IMAGE_PIXELS:,} pixels: a decompression bomb"
            raise ImageRefused("decompression_bomb", f"{name} {detail}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
            raise ImageRefused("undecodable_image", f"{name} cannot be opened as an image ({_why(e)})") from None
    width, height = im.size
    pixels = width * height
    limit = Image.MAX_IMAGE_PIXELS
    reason = "decompression_bomb" if limit and pixels > limit else "too_many_pixels" if pixels > max_pixels else None
    if reason and owned:
        im.close()
    if reason == "decompression_bomb":
        detail = f"over PIL's decompression-bomb limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)"
        raise ImageRefused(reason, f"{name} claims {width}x{height} = {pixels:,} pixels, {detail}")
    if reason == "too_many_pixels":  # a plain large photo, not an attack: say how to accept it
        detail = f"over the cap of {max_pixels:,}; raise max_pixels (training: --max_pixels) to accept it"
        raise ImageRefused(reason, f"{name} is {width}x{height} = {pixels:,} pixels, {detail}")
    return im, name, owned


def _quiet_pil_bomb_warning() -> None:
    """Silence PIL's DecompressionBombWarning, once: open_header makes the same check and refuses, counted.

    Pitfall: a `warnings.catch_warnings()` block per image would reset Python's show-once registry on every exit,
    so every show-once warning of the process would print once per image. Adding the filter only when it is
    missing mutates the filter list once. It applies process-wide; PIL's error above twice its limit stays.
    """
    if _QUIET_BOMB_WARNING not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _image_file(src: Any) -> tuple[Any, str, bool]:
    """An image source -> (what Image.open takes, how messages name it, whether closing it is ours to do)."""
    if isinstance(src, dict):  # HF Image feature storage: inline bytes win over the path
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(src), f"image of {shorten(src)}", True
    if isinstance(src, (str, os.PathLike)):
        text = os.fspath(src)
        if isinstance(text, str) and text.startswith(("http://", "https://")):
            raise ImageRefused("image_url", f"image {shorten(text)} is a URL; only local files are opened")
        shown = f"image {shorten(Path(text).name)}"  # the name only: no folders of this machine in messages
        return check_file(Path(text), shown), shown, True
    if hasattr(src, "read"):  # a binary file object, e.g. an upload. Pitfall: PIL's close() would close it too
        return src, f"image {shorten(Path(str(getattr(src, 'name', 'upload'))).name)}", False
    expected = "a path, bytes, a file object, {'bytes', 'path'} or a PIL image"
    raise ImageRefused("malformed_record", f"unusable image reference {shorten(src)}: expected {expected}")


def check_file(path: Path, shown: str) -> Path:
    """`path` if it is a regular file; otherwise ImageRefused saying honestly what it is. Never opens it (a FIFO
    would block forever)."""
    try:
        mode = path.stat().st_mode  # follows symlinks: the target is what we would read
    except ValueError:  # "embedded null byte"
        raise ImageRefused("bad_path", f"{shown}: the path holds a NUL byte") from None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ImageRefused("missing_image", f"{shown} not found") from None
        raise ImageRefused("bad_path", f"{shown}: unusable path ({e.strerror})") from None  # too long, no access
    if stat.S_ISDIR(mode):
        raise ImageRefused("not_a_file", f"{shown} is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise ImageRefused("not_a_file", f"{shown} is not a regular file (a FIFO, socket or device); not read")
    return path


def _why(err: BaseException) -> str:
    """An exception's text without object reprs or file paths (PIL writes both into its messages)."""
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image format PIL can read"
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<file>", str(err))
    text = re.sub(r"'/[^']*'", "<path>", text)
    return shorten(text, 120).strip("'\"")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> a new RGB image (so the source file can be closed). Orientation: see load_rgb."""
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
        detail = "the path holds a NUL byte" if "\0" in rel else f"unusable path ({_why(e)})"
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
        return _decode_opened(*open_header(src, max_pixels=max_pixels, name=shown))
    except ImageRefused as e:
        raise BadRecord(e.reason, field, str(e)) from None


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


@dataclass
class _BadLine:
    """A .jsonl line that is not JSON: counted as malformed_record (with its line number), not fatal to the file."""

    line: int
    error: str


def _json_line(text: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _BadLine(line, f"{e.msg} at column {e.colno}")


def _utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """Decode or say where: a bare UnicodeDecodeError names neither the file nor the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        detail = f"byte {raw[e.start]:#04x} at line {line} is not UTF-8"
        raise ValueError(f"data file {path}: {detail}; save the file as UTF-8") from None


def read_file(path: Path) -> list | _RawRows:
    """Local files are read whole even with streaming=True (text only; images stay lazy)."""
    if path.suffix == ".parquet":
        return _RawRows(datasets.Dataset.from_parquet(str(path)))
    with open(path, "rb") as f:
        if path.suffix == ".jsonl":  # split on b"\n" only: JSON strings may hold U+2028, which splitlines() cuts at
            lines = ((n, _utf8(raw, path, n).removeprefix("\ufeff")) for n, raw in enumerate(f, 1))
            return [_json_line(text, n) for n, text in lines if text.strip()]
        text = _utf8(f.read(), path).removeprefix("\ufeff")  # a BOM (Windows editors) is not JSON
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"data file {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
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
        self.skipped: Counter[str] = Counter()  # reason -> number of records skipped at load time
        self.late_skipped: Counter[str] = Counter()  # the same, for images that failed to decode later, per example
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
            messages, refs, fields = normalize(rec, index)
            for ref, field in zip(refs, fields):
                _probe(ref, source.root, field, self.max_pixels)
            return messages, refs, fields
        except BadRecord as err:
            self._bad(source, index, err)

    def _example(self, source: Source, index: int, messages: list, refs: list, fields: list) -> dict | None:
        """Decode the images (None, counted in `late_skipped`, if one fails: a whole header over cut pixel data)."""
        try:
            images = [_decode(ref, source.root, field, self.max_pixels) for ref, field in zip(refs, fields)]
        except BadRecord as err:
            msg = f"{source.name} record {index}: {err} [{err.reason}]"
            if self.strict:
                raise ValueError(msg) from None
            self.late_skipped[err.reason] += 1
            total = sum(self.late_skipped.values())
            if total <= 5 or total % 100 == 0:  # say it early, then now and then: never once per image forever
                log.warning("VLM data: skipped while training (%d so far): %s", total, msg)
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

    def messages(self, idx: int) -> list[dict]:
        """The chat messages of item `idx`, without opening its images (what packing needs for lengths)."""
        source, i = self.sources[self._source[idx]], self._row[idx]
        return normalize(source.records[i], i)[0]

    def to_hf(self) -> datasets.Dataset:
        """The same examples as a `datasets.Dataset`, for SFTTrainer. An example whose images fail to decode is
        replaced by the next one that works (counted in `late_skipped`), so a batch is never left empty."""
        return datasets.Dataset.from_dict({"index": list(range(len(self)))}).with_transform(self._hf_batch)

    def _hf_batch(self, batch: dict) -> dict:
        examples = [self.replaced_if_bad(i) for i in batch["index"]]
        return {key: [ex and ex[key] for ex in examples] for key in ("messages", "images")}

    def replaced_if_bad(self, idx: int, tries: int = REPLACE_TRIES) -> dict | None:
        """Example `idx` or, if it fails to decode, the next good one (deterministic: idx+1, idx+2, ... wrapping).

        None (all-None fields in to_hf(), counted by the collator) only after `tries` failures in a row.
        Pitfall: evaluation must not use this: it would score one example twice. It indexes `ds[i]` instead.
        """
        for k in range(min(tries, len(self))):
            example = self[(idx + k) % len(self)]
            if example is not None:
                return example
        return None


class IterableVLMDataset(_Records, torch.utils.data.IterableDataset):
    """Streaming: normalises and checks record by record; counts restart with each pass over the data."""

    streaming = True

    def __iter__(self) -> Iterator[dict]:
        self.skipped.clear()
        self.late_skipped.clear()
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
