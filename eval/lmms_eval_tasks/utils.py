"""lmms-eval hooks for a local held-out set in this repo's formats: LLaVA (`from`/`value`) or role/content
(`role`/`content`, minimind-v) conversations with an `image` field (one path, a list, or "a.jpg,b.jpg").

Notable:
- lmms-eval imports this file by itself (`--include_path`); it must not import the repo (lmms-eval lives in its own
  environment, without our dependencies).
- The question is the user turn before the last assistant turn, the reference that assistant turn (as evaluate.py);
  earlier turns are not shown to the model, so score single-turn records.
- `<image>` is taken out of the question: lmms-eval places the image itself (chat path: an image item before the
  text, which the export's chat template writes as `<|vision_start|><image><|vision_end|>`, the training layout).
- Scoring is evaluate.py's normalised exact match (case, ASCII/CJK punctuation and English articles ignored).
"""

import re
from pathlib import Path

from PIL import Image

ARTICLES = {"a", "an", "the"}
PUNCTUATION = re.compile(r"[\s.,!?;:'\"。，！？；：、]+")  # keep in step with evaluate.py


def normalize_answer(text: str) -> str:
    words = [w for w in PUNCTUATION.split(text.lower()) if w and w not in ARTICLES]
    return " ".join(words)


def _turns(doc: dict) -> list[tuple[str, str]]:
    """(role, text) per turn, in either conversation format."""
    turns = doc.get("conversations") or []
    return [(t.get("role") or t.get("from"), t.get("content") if "content" in t else t.get("value")) for t in turns]


def _last_exchange(doc: dict) -> tuple[str, str]:
    turns = _turns(doc)
    last = max((i for i, (role, _) in enumerate(turns) if role in ("assistant", "gpt")), default=None)
    if last is None or last == 0:
        raise ValueError(f"record {str(doc)[:120]} has no user turn followed by an assistant turn")
    return turns[last - 1][1], turns[last][1]


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[Image.Image]:
    root = Path((lmms_eval_specific_kwargs or {}).get("image_root", "."))
    refs = doc.get("image") or []
    refs = [r.strip() for r in refs.split(",")] if isinstance(refs, str) else list(refs)
    return [Image.open(root / ref).convert("RGB") for ref in refs if ref]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    question, _ = _last_exchange(doc)
    return question.replace("<image>\n", "").replace("<image>", "").strip()


def doc_to_target(doc: dict) -> str:
    return _last_exchange(doc)[1]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc_to_target(doc)))}
