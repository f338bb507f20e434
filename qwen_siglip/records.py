"""Records of every supported format -> TRL's conversational messages, checked field by field.

    llava     {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nDescribe..."}, ...]}
    role/text {"image": "a.jpg, b.jpg", "conversations": [{"role": "user", "content": "..<image>..<image>"}, ...]}
    captions  {"image_id": "x.jpg", "caption": ["cap 1", "cap 2"]}  (AI Challenger) -> ONE Q&A per record
    trl       {"messages": [...], "images": [...]}, content typed or a string with <image>
    vqa       {"image": ..., "question": "...", "answer": "..." | "answers": [...]}  (benchmarks: POPE, MME, TextVQA)

Notable:
- The format is recognised per record from its keys; `normalize` returns (messages, image references, the field each
  reference came from) or raises `BadRecord` with the reason it is counted under and the record's own field.
- `<image>` placeholders are split on the processor's own rule (`LLAVA_PLACEHOLDER_RE`): the newline right after
  `<image>` belongs to it, so a raw inference prompt and a training record tokenize alike.
- A record with one image and no placeholder gets the image before its first user turn (LLaVA's convention).
- Every field a format reads is type-checked (`_text`, `_image_ref`, `_answers`): a wrong type is a counted skip
  (`malformed_record`) that names the field and what was expected, never a TypeError or KeyError from the load.
  Text with an unpaired surrogate (a JSON `\\ud800` escape) is `invalid_unicode`: the tokenizer cannot encode it.
"""

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from processing_qwen_siglip import LLAVA_PLACEHOLDER_RE
from qwen_siglip.images import ImageRefused, shorten

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CAPTION_PROMPTS = {
    "en": ["Describe this image.", "What is in this picture?", "Write a short caption for this image."],
    "zh": ["描述这张图片。", "这张图片里有什么？", "请用一句话描述这张图片。"],
}
CJK = re.compile(r"[\u4e00-\u9fff]")
SURROGATE = re.compile("[\ud800-\udfff]")  # valid in a Python str, not in UTF-8: tokenizers refuse it


class BadRecord(ImageRefused):
    """A record we refuse to train on: a refusal that also names the record's field."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(reason, f"field '{field}': {detail}")


@dataclass
class BadLine:
    """A .jsonl line that is not JSON: counted as malformed_record (with its line number), not fatal to the file."""

    line: int
    error: str


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


def kind(value: Any) -> str:
    """A value's type in the words of JSON, for messages: 'a number', 'an object', 'null'."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    names = {str: "text", int: "a number", float: "a number", list: "a list", tuple: "a list", dict: "an object"}
    return next((name for t, name in names.items() if isinstance(value, t)), f"a {type(value).__name__}")


def checked_text(value: Any, field: str, what: str = "text") -> str:
    """`value` if it is text the tokenizer can encode; otherwise BadRecord naming the field."""
    if not isinstance(value, str):
        raise BadRecord("malformed_record", field, f"expected {what}, got {kind(value)}")
    if SURROGATE.search(value):  # e.g. a JSON "\\ud800" escape: a str in Python, but no UTF-8 encodes it
        raise BadRecord("invalid_unicode", field, "text holds an unpaired surrogate (not valid Unicode)")
    return value


def _typed_item(item: Any, field: str) -> dict:
    item_type = item.get("type") if isinstance(item, dict) else None
    if item_type == "image":  # arrow gives image items a "text": None column too: drop it
        return {"type": "image"}
    if item_type == "text":
        return {"type": "text", "text": checked_text(item.get("text"), f"{field}.text")}
    if isinstance(item, dict):
        got = f"an item of type {shorten(item_type) if isinstance(item_type, str) else kind(item_type)}"
    else:
        got = kind(item)
    raise BadRecord("malformed_record", field, f"expected an item of type 'text' or 'image', got {got}")


def parse_turn(turn: Any, field: str) -> dict:
    if not isinstance(turn, dict):
        raise BadRecord("malformed_record", field, f"expected a turn (an object), got {kind(turn)}")
    given = turn.get("role") or turn.get("from")  # role/content or LLaVA's from/value
    role = ROLES.get(given.lower()) if isinstance(given, str) else None
    if role is None:
        shown = shorten(given) if isinstance(given, str) else kind(given)
        raise BadRecord("unknown_role", field, f"unknown role {shown}")
    key = "content" if "content" in turn else "value"
    text = turn.get(key)
    if isinstance(text, list):
        return {"role": role, "content": [_typed_item(item, f"{field}.{key}[{k}]") for k, item in enumerate(text)]}
    text = checked_text(text, f"{field}.{key}", "text or a list of items")
    return {"role": role, "content": split_placeholders(text)}


def _image_ref(value: Any, field: str) -> Any:
    """One image reference, type-checked: a path, bytes, HF's {"bytes", "path"} or a PIL image."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadRecord("malformed_record", f"{field}.bytes", f"expected binary data, got {kind(data)}")
        if path is not None and not isinstance(path, str):
            raise BadRecord("malformed_record", f"{field}.path", f"expected a path (text), got {kind(path)}")
        if not data and not path:
            raise BadRecord("malformed_record", field, "an image object with neither bytes nor a path")
        return value
    if isinstance(value, (str, bytes, bytearray, memoryview, Image.Image)):
        return value
    expected = "a path, bytes or {'bytes', 'path'}"
    raise BadRecord("malformed_record", field, f"expected an image ({expected}), got {kind(value)}")


def image_refs(value: Any, field: str) -> tuple[list, list[str]]:
    """A record's image field -> (references, the field each came from: `images[1]`, or `image` if only one)."""
    if value is None or value == "":
        return [], []
    if isinstance(value, str):  # minimind-v: "a.jpg, b.jpg". Pitfall: a file name holding a comma is split too
        refs = [p.strip() for p in value.split(",") if p.strip()]
        return refs, [f"{field}[{k}]" if len(refs) > 1 else field for k in range(len(refs))]
    if isinstance(value, (list, tuple)):  # each item one reference; null or empty items are left out
        kept = [(v, f"{field}[{k}]") for k, v in enumerate(value) if v is not None and v != ""]
        return [_image_ref(v, f) for v, f in kept], [f for _, f in kept]
    return [_image_ref(value, field)], [field]


def _caption_turns(rec: dict, index: int) -> list[dict]:
    """Captions -> one user/assistant pair; caption and prompt picked from the record index (reproducible)."""
    value = rec["caption"]
    if isinstance(value, list):
        captions = [checked_text(c, f"caption[{k}]") for k, c in enumerate(value)]
    else:
        captions = [checked_text(value, "caption", "text or a list of texts")]
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise BadRecord("empty_turn", "caption", "no non-empty caption")
    caption = captions[index % len(captions)]
    prompts = CAPTION_PROMPTS["zh" if CJK.search(caption) else "en"]  # ask in the language of the answer
    prompt = prompts[index % len(prompts)]
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]


def _answer(value: Any, field: str) -> str:
    """One answer as text: text, or a number (some sets store counts as numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return checked_text(value, field, "text or a number").strip()


def _answers(rec: dict) -> list[str]:
    """`answer` (one) or `answers` (a list, VQAv2's [{"answer": ...}], or HF's {"answer": [...]}) -> their texts."""
    if rec.get("answer") is not None:
        return [_answer(rec["answer"], "answer")]
    values, field = rec.get("answers"), "answers"
    if values is None:
        raise BadRecord("no_assistant_turn", "answer", "no answer or answers: nothing to learn")
    if isinstance(values, dict):  # a Hub list of structs arrives as a struct of lists: {"answer": [...]}
        values, field = values.get("answer"), "answers.answer"
    if not isinstance(values, (list, tuple)):
        raise BadRecord("malformed_record", field, f"expected a list of answers, got {kind(values)}")
    answers = []
    for k, value in enumerate(values):
        if isinstance(value, dict):  # VQAv2: [{"answer": ..., "answer_confidence": ...}]
            value = value.get("answer")
            answers.append(_answer(value, f"{field}[{k}].answer"))
        else:
            answers.append(_answer(value, f"{field}[{k}]"))
    return answers


def _vqa_turns(rec: dict) -> list[dict]:
    """Benchmark-style question/answer -> one user/assistant pair (several answers: the most common, as VQA scores)."""
    question = checked_text(rec["question"], "question")
    answers = [a for a in _answers(rec) if a]
    if not question.strip() or not answers:
        raise BadRecord("empty_turn", "answer" if question.strip() else "question", "empty question or answer")
    answer = Counter(answers).most_common(1)[0][0]
    user = split_placeholders(question)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def normalize(rec: Any, index: int) -> tuple[list[dict], list, list[str]]:
    """One raw record -> (messages, image references, the field each reference came from). Raises BadRecord."""
    if isinstance(rec, BadLine):
        raise BadRecord("malformed_record", "record", f"line {rec.line} is not valid JSON ({rec.error})")
    if not isinstance(rec, dict):
        raise BadRecord("malformed_record", "record", f"not a JSON object: {shorten(str(rec))}")
    # messages must name the record's own key: `images` in TRL's format, `image` in LLaVA's, `image_id` in captions
    default = "images" if "messages" in rec else "image"
    field = next((k for k in ("images", "image", "image_id") if rec.get(k) is not None), default)
    refs, fields = image_refs(rec.get(field), field)
    if "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        if not isinstance(rec[key], list):
            raise BadRecord("malformed_record", key, f"expected a list of turns, got {kind(rec[key])}")
        messages = [parse_turn(turn, f"{key}[{j}]") for j, turn in enumerate(rec[key])]
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
