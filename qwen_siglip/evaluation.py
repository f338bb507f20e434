"""Score a model on held-out examples: batched greedy answers, blind baselines, metrics of our own and yours.

Notable:
- Any example the data module gives works: the last assistant turn is the reference, everything before it (earlier
  turns included) is the prompt.
- Blind baselines answer the same prompts with the images replaced: `shuffled` gives each example another
  example's images (never its own; another example asked the same question where there is one: a real picture of
  the kind the question is asked of, showing something else), `blank` a grey image,
  and a function of your own `(image, example index) -> image` whatever you choose (the quickstart's is a
  shape-free scene on a training background). A blank image unlike any training image can make a model write junk
  and score below chance; a shuffled one keeps the model on familiar input, so it measures what the question
  alone gives away. The summary's `blind_*` scores are the highest over the blinds: the baseline to beat.
- `scorers` add per-example metrics, `function(prediction, reference)` -> a number, a bool or None (not
  applicable), averaged over the examples they apply to, each with its blind baselines beside it. What is right is
  the scorer's call; this module stays generic.
- Prompts longer than the model's context (minus `max_new_tokens`) are skipped and counted, before any image is
  processed: a 1 MB question costs a fraction of a second instead of a generation over 250k tokens.
"""

import importlib
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

from qwen_siglip.inference import context_length, prompt_length
from qwen_siglip.metrics import bleu4, cider_d, normalize_answer

log = logging.getLogger(__name__)

Scorer = Callable[[str, str], float | bool | None]  # (prediction, reference) -> score, or None: not applicable
BlindImage = Callable[[Image.Image, int], Image.Image]  # (the image it replaces, the example's index) -> an image
DEFAULT_BLINDS = ("shuffled", "blank")  # evaluate_vlm.py's, when --blind is not given


def split_example(example: dict) -> tuple[list[dict], str]:
    """(prompt messages, reference answer): the last assistant turn is the reference."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], text_of(messages[last])


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(c.get("text") or "" for c in content)


def blank(image: Image.Image, index: int) -> Image.Image:
    """A grey image of the same size: nothing to see."""
    return Image.new("RGB", image.size, (128, 128, 128))


def cycle(n: int, rng: random.Random) -> list[int]:
    """A random permutation of range(n) with no fixed point: one cycle through all n (Sattolo's shuffle)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):  # j < i, never j == i: that is what leaves nobody in place
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return order


def shuffled(images: list[list[Image.Image]], keys: list | None = None, seed: int = 0) -> list[list] | None:
    """Every example's images replaced by another example's, so no example keeps its own; None with fewer than two
    examples that have images. Examples with the same key (`evaluate` passes the prompt) swap among themselves: the
    same question, asked of another picture of its kind; those whose key no other shares swap among themselves."""
    keys = keys or [None] * len(images)
    groups = defaultdict(list)  # key -> the examples with images that hold it, in order
    for i, imgs in enumerate(images):
        if imgs:
            groups[keys[i]].append(i)
    cycles, lone = [g for g in groups.values() if len(g) > 1], [g[0] for g in groups.values() if len(g) == 1]
    if len(lone) == 1 and cycles:
        cycles[0].append(lone[0])  # alone in the world: join a group rather than keep its own image
    elif len(lone) > 1:
        cycles.append(lone)
    if not cycles:
        return None
    rng, blind = random.Random(seed), [list(imgs) for imgs in images]
    for members in cycles:
        for member, k in zip(members, cycle(len(members), rng)):
            donor = images[members[k]]
            blind[member] = [donor[n % len(donor)] for n in range(len(images[member]))]  # as many as it holds
    return blind


def blind_images(blind: str | BlindImage, images: list[list[Image.Image]], keys: list) -> list[list] | None:
    """The images of one blind baseline: "shuffled" (by `keys`), or a BlindImage applied to every image."""
    if blind == "shuffled":
        return shuffled(images, keys)
    return [[blind(image, i) for image in imgs] for i, imgs in enumerate(images)]


def load_blind(spec: str) -> tuple[str, str | BlindImage]:
    """ "shuffled", "blank" or "module:function" (a BlindImage) -> (name, what `blind_images` takes)."""
    if spec in ("shuffled", "blank"):
        return spec, blank if spec == "blank" else spec
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--blind {spec!r}: expected shuffled, blank or module:function (image, index) -> image")
    return name, getattr(importlib.import_module(module), name)


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
    """[(templated prompt, images, reference, question)] of the usable examples (the question: the prompt's last turn,
    as text), and the count of those skipped, by reason."""
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
        kept.append((text, example["images"], reference, text_of(messages[-1]) if messages else ""))
    if skipped["prompt_too_long"]:
        log.warning(
            f"skipped {skipped['prompt_too_long']} of {len(examples)} examples: prompt longer than the model's "
            f"context ({limit + max_new_tokens} tokens) minus --max_new_tokens ({max_new_tokens})"
        )
    return kept, skipped


def scored(answers: list[str], references: list[str], scorers: dict[str, Scorer]) -> list[dict]:
    """Per answer: the answer, its exact match, CIDEr-D (over this set of answers) and the scorers."""
    rows = []
    for answer, reference, cider in zip(answers, references, cider_d(answers, references)):
        right = normalize_answer(answer) == normalize_answer(reference)
        rows.append({"prediction": answer, "exact_match": right, "cider": cider})
        rows[-1] |= {name: scorer(answer, reference) for name, scorer in scorers.items()}
    return rows


def score(kept: list[tuple], answers: list[str], blind: dict[str, list[str] | None], scorers: dict) -> list[dict]:
    """One prediction record per example: the question, the reference, the answer with its scores (BLEU-4 too), and
    under "blind" each blind baseline's answer with its scores."""
    references = [reference for _, _, reference, _ in kept]
    blinds = {name: scored(guesses, references, scorers) for name, guesses in blind.items() if guesses is not None}
    predictions = []
    for i, ((_, _, reference, question), row) in enumerate(zip(kept, scored(answers, references, scorers))):
        p = {"question": question, "reference": reference, **row, "bleu4": bleu4(row["prediction"], reference)}
        predictions.append(p | {"blind": {name: rows[i] for name, rows in blinds.items()}})
    return predictions


def summarize(predictions: list[dict], scorers: dict, blind: dict[str, list | None], skipped: Counter) -> dict:
    """Means over the examples (a scorer's None, not applicable, is left out of its mean), each blind baseline's
    means under "blind" (None where it could not run), `blind_<metric>`: the highest of them, and the skip counts."""
    summary = {"examples": len(predictions)}
    summary |= {key: mean([p[key] for p in predictions]) or 0.0 for key in ("exact_match", "bleu4", "cider")}
    summary |= {name: mean([p[name] for p in predictions]) for name in scorers}
    keys = ("exact_match", "cider", *scorers)
    summary["blind"] = {
        name: None if guesses is None else {key: mean([p["blind"][name][key] for p in predictions]) for key in keys}
        for name, guesses in blind.items()
    }
    for key in keys:  # the baseline to beat is the strongest one
        values = [b[key] for b in summary["blind"].values() if b and b[key] is not None]
        summary[f"blind_{key}"] = max(values, default=None)
    summary["skipped"] = {reason: k for reason, k in skipped.items() if k}
    return summary


def evaluate(
    model,
    processor,
    examples: list[dict | None],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    scorers: dict[str, Scorer] | None = None,
    blinds: dict[str, str | BlindImage] | None = None,
) -> dict:
    """Score the model and its blind baselines; returns {"summary", "predictions", "images"} (the images of each
    scored example, for the HTML page).

    Examples that failed to decode (None) and prompts too long for the context are skipped and counted in
    `summary["skipped"]`; `scorers` add per-example metrics, `blinds` (name -> "shuffled" or a BlindImage; default
    shuffled and blank) the baselines (see the module docstring).
    """
    scorers = scorers or {}
    blinds = dict(map(load_blind, DEFAULT_BLINDS)) if blinds is None else blinds
    kept, skipped = prompts_that_fit(model, processor, examples, max_new_tokens)
    texts, images = [text for text, *_ in kept], [imgs for _, imgs, *_ in kept]
    answers = generate_answers(model, processor, list(zip(texts, images)), batch_size, max_new_tokens)
    blind_answers = {}
    for name, blind in blinds.items():
        swapped = blind_images(blind, images, keys=texts)
        if swapped is None:
            log.warning(f"blind baseline {name!r} left out: it needs at least two examples with images")
        else:
            swapped = generate_answers(model, processor, list(zip(texts, swapped)), batch_size, max_new_tokens)
        blind_answers[name] = swapped
    predictions = score(kept, answers, blind_answers, scorers)
    summary = summarize(predictions, scorers, blind_answers, skipped)
    return {"summary": summary, "predictions": predictions, "images": images}


def load_scorer(spec: str) -> tuple[str, Scorer]:
    """'module:function' -> (function name, function), e.g. 'synthetic:caption_correct'."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--scorer {spec!r}: expected module:function, e.g. synthetic:caption_correct")
    return name, getattr(importlib.import_module(module), name)
