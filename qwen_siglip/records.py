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
"""

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from processing_qwen_siglip import LLAVA_PLACEHOLDER_RE
from qwen_siglip.images import ImageRefused, shorten

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CAPTION_PROMPTS = {
    "en": ["Describe this image.", "What is in this picture?", "Write a short caption for this image."],
    "zh": ["描述这张图片。", "这张图片里有什么？", "请用一句话描述这张图片。"],
}
CJK = re.compile(r"[\u4e00-\u9fff]")


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
    if isinstance(rec, BadLine):
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
