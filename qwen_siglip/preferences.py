"""Stage 3's data: preference pairs (DPO) and prompts with a reference answer (GRPO), read like every other record.

    trl      {"prompt": [turns] | "text", "chosen": [turns] | "text", "rejected": [turns] | "text", "images": [...]}
             without "prompt": the turns chosen and rejected share are the prompt (TRL's implicit-prompt format)
    rlaif-v  {"image": ..., "question": "...", "chosen": "...", "rejected": "..."}    (openbmb/RLAIF-V-Dataset)
    prompts  any format data.py reads; the last assistant turn is the reference answer the reward sees

Notable:
- The datasets are data.py's with another record normaliser (`normalize_pair`, `normalize_prompt`), so they read
  the same sources (.json, .jsonl, .parquet, a folder, a Hub id), open images with the same opener under the same
  root rules, and skip, count and report bad records with the same reasons and strict mode. Messages name the
  record's own field (`chosen`, `prompt[1]`, `images[0]`).
- A pair is (prompt, chosen, rejected): the prompt ends with a user turn; chosen and rejected are one assistant turn
  each, with text and no image. One image and no placeholder: the image goes before the first question (LLaVA's
  convention, as records.py). A pair whose chosen and rejected say the same is skipped as `identical_pair`: DPO has
  nothing to learn from it.
- `write_pairs` makes pairs from any Q&A set whose answers can be spoiled on purpose (RLAIF-V's idea: the right
  answer vs one with a hallucinated attribute): the caller's `corrupt` function decides how.
- GRPO prompts: the reference answer lands in `solution`, the column TRL's reward functions read; the turns before
  it are the prompt. A prompt longer than `max_prompt_length` tokens (text + image tokens, counted without decoding
  an image) is skipped as `prompt_too_long` at load: GRPO cannot shorten a prompt without cutting its image or its
  question, and generation would run past the context.
"""

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from qwen_siglip.data import VLMDataset
from qwen_siglip.records import BadRecord, checked_text, image_refs, kind, normalize, parse_turn, split_placeholders
from qwen_siglip.sources import find_sources

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "images")  # what DPOTrainer and our PairCollator read
PROMPT_COLUMNS = ("prompt", "images", "solution")  # what GRPOTrainer reads; other columns reach the rewards


class Pair(NamedTuple):
    prompt: list[dict]
    chosen: list[dict]  # one assistant turn
    rejected: list[dict]  # one assistant turn


class Prompt(NamedTuple):
    prompt: list[dict]
    solution: str  # the reference answer's text


def _joined(turns: list[dict]) -> str:
    """The text of typed turns, joined."""
    return "".join(item["text"] for m in turns for item in m["content"] if item["type"] == "text")


def _turns(value: Any, key: str, role: str) -> list[dict]:
    """A field that is text (one turn of `role`) or a list of turns -> typed turns."""
    if isinstance(value, str):
        return [{"role": role, "content": split_placeholders(checked_text(value, key))}]  # valid Unicode too
    if not isinstance(value, list) or not value:
        raise BadRecord("malformed_record", key, f"expected text or a non-empty list of turns, got {kind(value)}")
    return [parse_turn(turn, f"{key}[{j}]") for j, turn in enumerate(value)]


def _completion(turns: list[dict], key: str) -> list[dict]:
    """Check that a completion is one assistant turn with text and no image."""
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise BadRecord("malformed_record", key, f"must be one assistant turn, got {[m['role'] for m in turns]}")
    if any(item["type"] == "image" for item in turns[0]["content"]):
        raise BadRecord("malformed_record", key, "an image in a completion: images belong to the prompt")
    if not _joined(turns).strip():
        raise BadRecord("empty_turn", key, "empty answer")
    return turns


def _shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """TRL's implicit prompt: the turns both completions start with are the prompt, the rest the completions."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _check_prompt(prompt: list[dict], refs: list, key: str, field: str) -> None:
    """Ends with a question, no empty turn, one image per placeholder (a lone image goes before the question)."""
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("malformed_record", key, "the prompt must end with a user turn")
    for j, m in enumerate(prompt):
        if not any(item["type"] == "image" or item["text"].strip() for item in m["content"]):
            raise BadRecord("empty_turn", f"{key}[{j}]", f"empty {m['role']} turn")
    placeholders = sum(item["type"] == "image" for m in prompt for item in m["content"])
    if placeholders == 0 and len(refs) == 1:
        next(m for m in prompt if m["role"] == "user")["content"].insert(0, {"type": "image"})
        placeholders = 1
    if placeholders != len(refs):
        raise BadRecord(
            "placeholder_image_mismatch", field, f"{placeholders} <image> placeholders but {len(refs)} images"
        )


def _images(rec: dict) -> tuple[list, list[str], str]:
    """(image references, the field each came from, the image field's name), as records.normalize names them."""
    field = next((k for k in ("images", "image") if rec.get(k) is not None), "images")
    refs, fields = image_refs(rec.get(field), field)
    return refs, fields, field


def normalize_pair(rec: Any, index: int) -> tuple[Pair, list, list[str]]:
    """One raw preference record -> (Pair, image references, their fields). Raises BadRecord."""
    if not isinstance(rec, dict):
        return normalize(rec, index)  # raises: a bad .jsonl line or not an object, reported as for every record
    if "chosen" not in rec or "rejected" not in rec:
        raise BadRecord("malformed_record", "record", f"no chosen/rejected in keys {sorted(rec)}")
    refs, fields, field = _images(rec)
    key = next((k for k in ("prompt", "question") if k in rec), "chosen")
    if key == "chosen":  # implicit prompt: both completions are whole conversations
        turns = _turns(rec["chosen"], "chosen", "assistant"), _turns(rec["rejected"], "rejected", "assistant")
        prompt, chosen, rejected = _shared_prefix(*turns)
    else:
        prompt = _turns(rec[key], key, "user")
        chosen, rejected = (
            _turns(rec["chosen"], "chosen", "assistant"),
            _turns(rec["rejected"], "rejected", "assistant"),
        )
    pair = Pair(prompt, _completion(chosen, "chosen"), _completion(rejected, "rejected"))
    _check_prompt(pair.prompt, refs, key, field)
    if _joined(pair.chosen).strip() == _joined(pair.rejected).strip():
        raise BadRecord("identical_pair", "rejected", "the same answer as chosen: nothing to prefer")
    return pair, refs, fields


def normalize_prompt(rec: Any, index: int) -> tuple[Prompt, list, list[str]]:
    """Any record data.py reads -> (Prompt: the turns before the last answer, its text), references, fields."""
    messages, refs, fields = normalize(rec, index)
    key = next((k for k in ("messages", "conversations", "caption", "question") if k in rec), "messages")
    last = max(j for j, m in enumerate(messages) if m["role"] == "assistant" and _joined([m]).strip())
    if any(item["type"] == "image" for m in messages[last:] for item in m["content"]):
        raise BadRecord("malformed_record", key, "an image in or after the reference answer: it must be in the prompt")
    prompt = messages[:last]
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("malformed_record", f"{key}[{last}]", "the reference answer must follow a user turn")
    return Prompt(prompt, _joined([messages[last]]).strip()), refs, fields


class PreferenceDataset(VLMDataset):
    """data.py's map-style dataset over preference records: examples are {prompt, chosen, rejected, images}."""

    normalize = staticmethod(normalize_pair)

    def __getitem__(self, idx: int) -> dict | None:
        example = super().__getitem__(idx)  # {"messages": Pair, "images": [PIL]}, or None if an image failed
        return example and {**example.pop("messages")._asdict(), **example}

    def _hf_batch(self, batch: dict) -> dict:
        examples = [self.replaced_if_bad(i) for i in batch["index"]]
        return {key: [ex and ex[key] for ex in examples] for key in PAIR_COLUMNS}


class PromptDataset(VLMDataset):
    """data.py's map-style dataset as GRPO prompts: examples are {prompt, images, solution}; long prompts skipped."""

    normalize = staticmethod(normalize_prompt)

    def __init__(self, source: str, image_root: str | None = None, *, processor=None, max_prompt_length=None, **kw):
        self.processor, self.max_prompt_length = processor, max_prompt_length  # read by _check, during the load
        super().__init__(source, image_root, **kw)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "processor": None}  # only the load needs it; workers and hashing do not

    def _check(self, source, index: int, rec: Any) -> tuple | None:
        checked = super()._check(source, index, rec)
        if checked is None or not self.max_prompt_length:
            return checked
        if (n := prompt_tokens(self.processor, checked[0].prompt)) > self.max_prompt_length:
            detail = f"{n} prompt tokens (image tokens included), over max_prompt_length {self.max_prompt_length}"
            return self._bad(source, index, BadRecord("prompt_too_long", "prompt", detail))
        return checked

    def __getitem__(self, idx: int) -> dict | None:
        example = super().__getitem__(idx)
        return example and {**example.pop("messages")._asdict(), **example}

    def _hf_batch(self, batch: dict) -> dict:
        examples = [self.replaced_if_bad(i) for i in batch["index"]]
        return {key: [ex and ex[key] for ex in examples] for key in PROMPT_COLUMNS}


def prompt_tokens(processor, prompt: list[dict]) -> int:
    """Tokens of a prompt as generation sees it: the template's text up to `<|im_start|>assistant\\n`, with each
    image's one placeholder token expanded to `num_image_tokens`. No image is decoded."""
    text = processor.apply_chat_template(prompt, add_generation_prompt=True)
    images = sum(item["type"] == "image" for m in prompt for item in m["content"])
    return len(processor.tokenizer(text)["input_ids"]) + images * (processor.num_image_tokens - 1)


def load_pairs(source: str, image_root: str | None = None, *, streaming: bool = False, **options) -> PreferenceDataset:
    """Preference pairs from any source, checked at load; data.load_vlm_dataset's arguments (split, strict, limit,
    max_pixels)."""
    if streaming:
        raise ValueError("--dataset_streaming is not supported for preference data yet: download the set first")
    return PreferenceDataset(source, image_root, **options)


def prompt_loader(processor, max_prompt_length: int | None):
    """A loader with data.load_vlm_dataset's arguments that reads GRPO prompts and skips the over-long ones."""

    def load_prompts(
        source: str, image_root: str | None = None, *, streaming: bool = False, **options
    ) -> PromptDataset:
        if streaming:
            raise ValueError("--dataset_streaming is not supported for GRPO prompts yet: download the set first")
        return PromptDataset(source, image_root, processor=processor, max_prompt_length=max_prompt_length, **options)

    return load_prompts


def write_pairs(
    source: str, out: str | Path, corrupt: Callable[[str, random.Random], str | None], seed: int = 0
) -> Path:
    """Preference pairs from the Q&A records of any format data.py reads, as TRL-format .jsonl: the prompt is the
    turns before a record's last answer, chosen is that answer, rejected is `corrupt(answer, rng)` (None, or the same
    answer: no pair from that record; bad records are left out). Image references are written as the records hold
    them, relative to the data file's folder: write `out` into that folder."""
    rng, rows = random.Random(seed), []
    for src in find_sources(source, None, "train", False):
        for i, rec in enumerate(src.records):
            try:
                (prompt, answer), refs, fields = normalize_prompt(rec, i)
            except BadRecord:
                continue
            if not all(isinstance(ref, str) for ref in refs):
                raise ValueError(f"{src.name} record {i}: write_pairs takes image paths, not {type(refs[0]).__name__}")
            wrong = corrupt(answer, rng)
            if wrong is not None and wrong.strip() != answer:
                turn = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]  # noqa: E731
                rows.append({"prompt": prompt, "chosen": turn(answer), "rejected": turn(wrong), "images": refs})
    Path(out).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return Path(out)
