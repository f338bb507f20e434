"""Property-based: records of every format mutated at random, and image files with flipped bits, cuts and junk.

Whatever the record or the file: a non-strict load never raises, `ds[i]` (and a training draw) gives an example or
None and never raises, the collator takes every example it gives, and every skip is counted under a documented
reason. Strict refuses only with the project's own error (a ValueError naming the file, record, field and reason),
and exactly when the non-strict load skipped something. Deterministic: derandomized, no example database.
"""

import io
import json
import os
import random
import re
import tempfile
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen_siglip.collator import VLMCollator
from qwen_siglip.data import load_vlm_dataset

# The reasons of the README's error table: a skip under any other key is undocumented.
REASONS = {
    "missing_image", "not_a_file", "bad_path", "image_outside_root", "image_url", "too_many_pixels",
    "decompression_bomb", "undecodable_image", "empty_image", "placeholder_image_mismatch", "empty_turn",
    "unknown_role", "no_assistant_turn", "malformed_record", "invalid_unicode",
}  # fmt: skip
STRICT_ERROR = re.compile(r"d\.jsonl? record \d+: field '.*': .* \[([a-z_]+)\]", re.S)
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


_PICTURE = Image.new("RGB", (12, 9), (200, 30, 30))
_PICTURE.paste((20, 20, 220), (0, 0, 6, 9))
_NOISE = Image.frombytes("RGB", (40, 40), random.Random(0).randbytes(40 * 40 * 3))  # pixel data well past the header
SEEDS = [
    encoded(_NOISE, "JPEG"),
    encoded(_NOISE, "PNG"),
    encoded(_NOISE.convert("P"), "GIF"),
    encoded(_PICTURE, "PNG"),
    encoded(_PICTURE, "JPEG", quality=90),
    encoded(_PICTURE.convert("P"), "GIF"),
    encoded(_PICTURE, "WEBP"),
    encoded(_PICTURE, "BMP"),
    encoded(_PICTURE, "TIFF"),
    encoded(_PICTURE.convert("RGBA"), "PNG"),
    encoded(_PICTURE.convert("I;16"), "PNG"),
]


@st.composite
def image_bytes(draw) -> bytes:
    """A real image of some format, then maybe bits flipped, cut short, junk around it or its header replaced."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "cut", "append", "prepend", "header", "zero"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "append":
            data += draw(st.binary(max_size=64))
        elif op == "prepend":
            data[:0] = draw(st.binary(max_size=16))
        elif op == "header":
            data[:16] = draw(st.binary(min_size=16, max_size=16))
        elif op == "zero":
            data[at : at + 8] = bytes(min(8, len(data) - at))
    return bytes(data)


WORDS = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=1, max_size=12)
SPECIAL = ["", "   ", "\n", "<image>", "<image>\n<image>", "<|im_start|>assistant\n", "<|image_pad|>", "\u2028",
           "\u202e\u200b", "\0", "描述这张图片。", "🙂" * 3, "a\ud800b", "\udcff"]  # fmt: skip
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
ODD_TEXT = st.one_of(st.sampled_from(SPECIAL), SURROGATES, st.text(max_size=20))


def mostly(common, rare, one_in: int = 6):
    """`rare` about once in `one_in` draws. (one_of and sampled_from favour their first and last choices.)"""
    return st.integers(0, one_in - 1).flatmap(lambda k: rare if k == one_in // 2 else common)


TEXT = mostly(WORDS, ODD_TEXT)  # mostly ordinary text, so that records get as far as their images
GOOD_PATH = st.sampled_from(["img0.png", "img1.jpg"])  # they exist, though their bytes may be broken
HOSTILE_PATHS = st.sampled_from([
    "img0.png, img1.jpg", "img0.png,", "../outside.png", "/etc/hostname", "a\0b.png", "x" * 300 + ".png",
    "http://example.com/a.png", "", " ", ".", "..", "sub/", "nope.png", "dir.png", "fifo.png", "link_out.png",
    "loop.png", "sub/../img0.png", "img0.png\n", "\udcff.png",
])  # fmt: skip
PATH = mostly(GOOD_PATH, HOSTILE_PATHS, 3)
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), ODD_TEXT, PATH),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(ODD_TEXT, inner, max_size=3)),
    max_leaves=6,
)


@st.composite
def record(draw) -> dict:
    """A record of one of the five formats, then up to three mutations: a key dropped or a value replaced."""
    text, path = lambda: draw(TEXT), lambda: draw(PATH)  # noqa: E731
    images = draw(st.one_of(st.lists(PATH, min_size=1, max_size=1), PATH, st.lists(PATH, max_size=3)))
    fmt = draw(st.sampled_from(["llava", "role", "captions", "trl", "vqa"]))
    if fmt == "llava":
        turns = [{"from": "human", "value": "<image>\n" + text()}, {"from": "gpt", "value": text()}]
        rec = {"id": "0", "image": path(), "conversations": turns}
    elif fmt == "role":
        rec = {"conversations": [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]}
        rec["image"] = images
    elif fmt == "captions":
        rec = {"image_id": path(), "caption": draw(st.one_of(TEXT, st.lists(TEXT, max_size=3)))}
    elif fmt == "trl":
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text()}]}
        rec = {"messages": [user, {"role": "assistant", "content": [{"type": "text", "text": text()}]}]}
        rec["images"] = images
    else:
        answer = draw(st.one_of(st.tuples(st.just("answer"), TEXT), st.tuples(st.just("answers"), st.lists(TEXT))))
        rec = {"image": path(), "question": text(), answer[0]: answer[1]}
    for _ in range(draw(mostly(st.just(0), st.integers(1, 3), 2))):
        mutate(draw, rec)
    return rec


def mutate(draw, node) -> None:
    """Drop a key or replace a value somewhere inside `node` (a dict or list), in place."""
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child  # go deeper
            continue
        if isinstance(node, dict) and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(JUNK)
        return


def hostile_folder(base: Path, image0: bytes, image1: bytes) -> Path:
    """root/ with two (maybe broken) images, a folder, a FIFO, a symlink out of root and a symlink loop."""
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "dir.png").mkdir()
    (root / "img0.png").write_bytes(image0)
    (root / "img1.jpg").write_bytes(image1)
    (base / "outside.png").write_bytes(SEEDS[0])
    os.mkfifo(root / "fifo.png")  # never opened: it would block forever
    (root / "link_out.png").symlink_to(base / "outside.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    return root


def check_loads(path: Path, collator: VLMCollator) -> None:
    """The properties, for one data file."""
    ds = load_vlm_dataset(str(path))  # non-strict: never raises
    for i in range(len(ds)):
        for example in (ds[i], ds.replaced_if_bad(i)):
            assert example is None or set(example) == {"messages", "images"}
            collator.encode(example)  # never raises: a bad example is a counted skip
    assert set(ds.skipped) | set(ds.late_skipped) <= REASONS
    for reason in [*ds.skipped, *(f"{r} (late)" for r in ds.late_skipped)] or ["nothing skipped"]:
        event(reason)  # `pytest --hypothesis-show-statistics` shows what the generated data reached
    event(f"examples kept: {min(len(ds), 2)}")
    try:
        strict = load_vlm_dataset(str(path), strict=True)
        for i in range(len(strict)):
            strict[i]
    except ValueError as err:
        assert type(err) is ValueError, f"{type(err).__name__}: {err}"
        match = STRICT_ERROR.fullmatch(str(err))
        assert match and match.group(1) in REASONS, str(err)
        assert ds.skipped or ds.late_skipped  # strict refuses only what non-strict skips
    else:
        assert not ds.skipped and not ds.late_skipped


@FUZZ
@given(records=st.lists(record(), min_size=1, max_size=4), image0=image_bytes(), image1=image_bytes(), data=st.data())
def test_mutated_records_and_images_never_crash_the_load(records, image0, image1, data, tiny):
    collator = VLMCollator(tiny[1])
    with tempfile.TemporaryDirectory() as tmp:
        root = hostile_folder(Path(tmp), image0, image1)
        lines = [json.dumps(rec) for rec in records]
        if data.draw(st.booleans()):
            path = root / "d.jsonl"
            junk = data.draw(st.sampled_from(["", "{oops", "[1, 2", "null", "7", '"text"', "[" * 5000]))
            path.write_text("\n".join(lines + [junk]) + "\n")
        else:
            path = root / "d.json"
            path.write_text("[" + ",\n".join(lines) + "]")
        check_loads(path, collator)


@FUZZ
@given(images=st.lists(st.one_of(image_bytes(), st.binary(max_size=32)), min_size=1, max_size=3), paths=st.lists(PATH))
def test_inline_image_bytes_with_flipped_bits_and_junk_never_crash_the_load(images, paths, tiny):
    """HF's Image feature in parquet ({"bytes", "path"}), as Hub datasets store images."""
    collator = VLMCollator(tiny[1])
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]]  # fmt: skip
    rows = [{"messages": messages[0], "images": [{"bytes": b, "path": None}]} for b in images]
    utf8 = [p for p in paths if not re.search("[\ud800-\udfff]", p)]  # arrow stores valid UTF-8 only
    rows += [{"messages": messages[0], "images": [{"bytes": None, "path": p}]} for p in utf8]
    with tempfile.TemporaryDirectory() as tmp:
        root = hostile_folder(Path(tmp), SEEDS[0], SEEDS[1])
        path = root / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        ds = load_vlm_dataset(str(path))
        for i in range(len(ds)):
            collator.encode(ds[i])
        assert set(ds.skipped) | set(ds.late_skipped) <= REASONS
        for reason in [*ds.skipped, *(f"{r} (late)" for r in ds.late_skipped)] or ["nothing skipped"]:
            event(reason)


@pytest.mark.parametrize("junk", ["[" * 100_000, '{"a": ' * 100_000])
def test_a_file_nested_past_pythons_recursion_limit_is_refused_by_name(tmp_path, junk):
    """json.loads raises RecursionError, not a JSON error, on deep nesting: a .json file is refused naming itself,
    a .jsonl line is a counted skip naming its line."""
    (tmp_path / "deep.json").write_text(junk)
    with pytest.raises(ValueError, match=r"deep\.json: .*nested too deeply"):
        load_vlm_dataset(str(tmp_path / "deep.json"))
    (tmp_path / "deep.jsonl").write_text(junk + "\n")
    assert dict(load_vlm_dataset(str(tmp_path / "deep.jsonl")).skipped) == {"malformed_record": 1}
