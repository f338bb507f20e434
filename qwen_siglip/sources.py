"""Where records come from: a .json/.jsonl/.parquet file, a folder of them, a `save_to_disk` folder, or a Hub id.

Notable:
- Local files are read whole, text only (images stay lazy), even with streaming; a Hub id goes through
  `datasets.load_dataset`, and a streamed one is read record by record without decoding images.
- A file that is not JSON or not UTF-8 (or nested past Python's recursion limit) is an error naming the file and
  line; one bad .jsonl line is a `BadLine`, a counted skip naming its line, not fatal to the file.
- A `datasets.Dataset` is read as plain rows (`RawRows`): through its Image feature every access would decode.
- Each source carries its image root: `--image_root`, else the data file's folder.
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from qwen_siglip.records import BadLine

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
NESTED = "nested too deeply to read (brackets inside brackets past Python's recursion limit)"


class RawRows:
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
    records: Iterable  # list of raw records or RawRows (indexable), or a datasets.IterableDataset (streaming)
    root: Path | None  # image root, resolved


def _json_line(text: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(line, f"{e.msg} at column {e.colno}")
    except RecursionError:  # Python's parser recurses per bracket: `[[[[...` past ~1000 levels is no JSON error
        return BadLine(line, NESTED)


def _utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """Decode or say where: a bare UnicodeDecodeError names neither the file nor the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        detail = f"byte {raw[e.start]:#04x} at line {line} is not UTF-8"
        raise ValueError(f"data file {path}: {detail}; save the file as UTF-8") from None


def read_file(path: Path) -> list | RawRows:
    """Local files are read whole even with streaming=True (text only; images stay lazy)."""
    if path.suffix == ".parquet":
        return RawRows(datasets.Dataset.from_parquet(str(path)))
    with open(path, "rb") as f:
        if path.suffix == ".jsonl":  # split on b"\n" only: JSON strings may hold U+2028, which splitlines() cuts at
            lines = ((n, _utf8(raw, path, n).removeprefix("\ufeff")) for n, raw in enumerate(f, 1))
            return [_json_line(text, n) for n, text in lines if text.strip()]
        text = _utf8(f.read(), path).removeprefix("\ufeff")  # a BOM (Windows editors) is not JSON
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"data file {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"data file {path}: {NESTED}") from None
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
        return [Source(path.name, RawRows(ds), root or path.resolve())]
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES) if path.is_dir() else []
    if files:
        return [Source(f.name, read_file(f), root or path.resolve()) for f in files]
    # a Hub id (or a folder in Hub layout, e.g. data/train-*.parquet)
    ds = datasets.load_dataset(source, split=split, streaming=streaming)
    rows = ds.decode(False) if streaming else RawRows(ds)
    return [Source(source, rows, root or (path.resolve() if path.is_dir() else None))]
