"""Score a model on held-out examples: batched greedy answers, a blind baseline, metrics of our own and yours.

Notable:
- Any example the data module gives works: the last assistant turn is the reference, everything before it (earlier
  turns included) is the prompt.
- The blind baseline answers the same prompts with blank (grey) images: what the LM guesses from the question alone.
  A model that looks at images must beat it by a wide margin.
- `scorers` add per-example metrics, `function(prediction, reference)` -> a number, a bool or None (not
  applicable), averaged over the examples they apply to, each with its blind baseline beside it. What is right is
  the scorer's call; this module stays generic.
- Prompts longer than the model's context (minus `max_new_tokens`) are skipped and counted, before any image is
  processed: a 1 MB question costs a fraction of a second instead of a generation over 250k tokens.
"""

import importlib
import logging
from collections import Counter
from collections.abc import Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

from qwen_siglip.inference import context_length, prompt_length
from qwen_siglip.metrics import bleu4, cider_d, normalize_answer

log = logging.getLogger(__name__)

Scorer = Callable[[str, str], float | bool | None]  # (prediction, reference) -> score, or None: not applicable


def split_example(example: dict) -> tuple[list[dict], str]:
    """(prompt messages, reference answer): the last assistant turn is the reference."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    content = messages[last]["content"]
    reference = content if isinstance(content, str) else "".join(c.get("text", "") for c in content)
    return messages[:last], reference


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (128, 128, 128))


@torch.no_grad()
def generate_answers(
    model, processor, prompts: list[tuple[str, list]], batch_size: int = 16, max_new_tokens: int = 32
) -> list[str]:
    """Greedy answers for (templated prompt text, images) pairs, left-padded in batches."""
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
        chunk = prompts[start : start + batch_size]
        texts = [text for text, _ in chunk]
        images = [imgs for _, imgs in chunk]
        inputs = processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += processor.batch_decode(new, skip_special_tokens=True)
    return [a.strip() for a in answers]


def mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def prompts_that_fit(model, processor, examples: list[dict | None], max_new_tokens: int) -> tuple[list, Counter]:
    """[(templated prompt, images, reference)] of the usable examples, and the count of those skipped, by reason."""
    skipped = Counter({"undecodable": sum(e is None for e in examples)})
    limit = context_length(model) - max_new_tokens
    if limit <= 0:
        context = limit + max_new_tokens
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {context}-token context")
    kept = []
    for example in filter(None, examples):
        messages, reference = split_example(example)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        if prompt_length(processor, text, limit) > limit:  # before the processor touches the images
            skipped["prompt_too_long"] += 1
            continue
        kept.append((text, example["images"], reference))
    if skipped["prompt_too_long"]:
        log.warning(
            f"skipped {skipped['prompt_too_long']} of {len(examples)} examples: prompt longer than the model's "
            f"context ({limit + max_new_tokens} tokens) minus --max_new_tokens ({max_new_tokens})"
        )
    return kept, skipped


def score(references: list[str], answers: list[str], blind: list[str], scorers: dict[str, Scorer]) -> list[dict]:
    """One prediction record per example: the answers, exact match, BLEU-4, CIDEr-D and the scorers, blind too."""
    cider, blind_cider = cider_d(answers, references), cider_d(blind, references)
    predictions = []
    for reference, answer, guess, c, bc in zip(references, answers, blind, cider, blind_cider):
        p = {"reference": reference, "prediction": answer, "blind_prediction": guess}
        p["exact_match"] = normalize_answer(answer) == normalize_answer(reference)
        p["blind_exact_match"] = normalize_answer(guess) == normalize_answer(reference)
        p |= {"bleu4": bleu4(answer, reference), "cider": c, "blind_cider": bc}
        for name, scorer in scorers.items():
            p[name], p[f"blind_{name}"] = scorer(answer, reference), scorer(guess, reference)
        predictions.append(p)
    return predictions


def summarize(predictions: list[dict], scorers: dict[str, Scorer], skipped: Counter) -> dict:
    """Means over the examples (a scorer's None, not applicable, is left out of its mean) and the skip counts."""
    summary = {"examples": len(predictions)}
    for key in ("exact_match", "blind_exact_match", "bleu4", "cider", "blind_cider"):
        summary[key] = mean([p[key] for p in predictions]) or 0.0
    for name in scorers:
        summary[name] = mean([p[name] for p in predictions])
        summary[f"blind_{name}"] = mean([p[f"blind_{name}"] for p in predictions])
    summary["skipped"] = {reason: k for reason, k in skipped.items() if k}
    return summary


def evaluate(
    model,
    processor,
    examples: list[dict | None],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    scorers: dict[str, Scorer] | None = None,
) -> dict:
    """Score the model and its blind baseline; returns {"summary": {...}, "predictions": [...]}.

    Examples that failed to decode (None) and prompts too long for the context are skipped and counted in
    `summary["skipped"]`; `scorers` add per-example metrics (see the module docstring).
    """
    scorers = scorers or {}
    kept, skipped = prompts_that_fit(model, processor, examples, max_new_tokens)
    prompts = [(text, images) for text, images, _ in kept]
    blind = [(text, [blank_like(i) for i in images]) for text, images in prompts]
    answers = generate_answers(model, processor, prompts, batch_size, max_new_tokens)
    blind_answers = generate_answers(model, processor, blind, batch_size, max_new_tokens)
    predictions = score([reference for _, _, reference in kept], answers, blind_answers, scorers)
    return {"summary": summarize(predictions, scorers, skipped), "predictions": predictions}


def load_scorer(spec: str) -> tuple[str, Scorer]:
    """'module:function' -> (function name, function), e.g. 'synthetic:caption_correct'."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--scorer {spec!r}: expected module:function, e.g. synthetic:caption_correct")
    return name, getattr(importlib.import_module(module), name)
