"""Evaluate a checkpoint on a held-out set: answers by batched greedy generation, scored against the references.

    python evaluate.py --model outputs/quickstart/sft --dataset data/sft_test.jsonl --limit 200

Notable:
- Any format the data module reads works. Each example's last assistant turn is the reference; everything before it
  (earlier turns included) is the prompt.
- VQA-style normalised exact match, and for caption-like references BLEU-4 (per sentence) and CIDEr-D (over the set:
  n-grams weighted by how rare they are among the references, so "a photo of" earns little).
- The blind baseline answers the same prompts with blank (grey) images: what the LM guesses from the question alone.
  A model that looks at images must beat it by a wide margin.
- `--scorer module:function` adds a per-example metric of your own, `function(prediction, reference)` -> a number,
  a bool or None (not applicable), averaged over the examples it applies to, with its blind baseline beside it
  (the quickstart uses `synthetic:caption_correct`). evaluate.py stays generic; what is right is the scorer's call.
- Prompts longer than the model's context (minus `--max_new_tokens`) are skipped and counted, before any image is
  processed: a 1 MB question costs a fraction of a second instead of a generation over 250k tokens.
- Code from the Hub is not run unasked: a local folder loads with its own code (it is yours); a Hub id needs
  `--trust_remote_code` (and `--revision` pins the commit whose code you read). Checked before any download.
- Writes `predictions.jsonl` and `summary.json` to `--output_dir`; `--write_card` also puts the scores into the model
  folder's README.md as `model-index` metadata (what the Hub shows), so the next push carries them.
"""

import argparse
import importlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ARTICLES = {"a", "an", "the"}
PUNCTUATION = re.compile(r"[\s.,!?;:'\"。，！？；：、]+")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation (ASCII and CJK) and articles out: 'The Red.' == 'red'."""
    words = [w for w in PUNCTUATION.split(text.lower()) if w and w not in ARTICLES]
    return " ".join(words)


def tokens(text: str) -> list[str]:
    """Words of the normalised text; characters for CJK text, which has no spaces."""
    text = normalize_answer(text)
    return list(text.replace(" ", "")) if re.search(r"[\u4e00-\u9fff]", text) else text.split()


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu4(candidate: str, reference: str) -> float:
    """Sentence BLEU-4 (BLEU+1: add-one smoothing for n > 1 only) on words, or characters for CJK text."""
    cand, ref = tokens(candidate), tokens(reference)
    log_precision = 0.0
    for n in range(1, 5):
        c, r = ngrams(cand, n), ngrams(ref, n)
        overlap = sum(min(k, r[g]) for g, k in c.items())
        if n == 1 and overlap == 0:
            return 0.0  # not one word in common: smoothing must not invent a score
        smooth = int(n > 1)
        log_precision += math.log((overlap + smooth) / (sum(c.values()) + smooth)) / 4
    brevity = min(1.0, math.exp(1 - len(ref) / len(cand)))
    return brevity * math.exp(log_precision)


def cider_d(candidates: list[str], references: list[str], sigma: float = 6.0) -> list[float]:
    """CIDEr-D per example (one reference each): TF-IDF n-gram cosine, n = 1..4, clipped, length-penalised, x10."""
    cands, refs = [tokens(c) for c in candidates], [tokens(r) for r in references]
    scores = [0.0] * len(cands)
    for n in range(1, 5):
        ref_grams = [ngrams(r, n) for r in refs]
        df = Counter(g for grams in ref_grams for g in grams)  # in how many references each n-gram occurs
        idf = {g: math.log(len(refs) / k) for g, k in df.items()}
        for i, (cand, ref, r) in enumerate(zip(cands, refs, ref_grams)):
            c = ngrams(cand, n)
            # n-grams no reference holds get the largest idf (df of 1): rare, but never rewarded below
            vc = {g: k * idf.get(g, math.log(len(refs))) for g, k in c.items()}
            vr = {g: k * idf[g] for g, k in r.items()}
            dot = sum(min(vc[g], vr[g]) * vr[g] for g in vc.keys() & vr.keys())  # min(): the "-D" clipping
            norm = math.sqrt(sum(v * v for v in vc.values())) * math.sqrt(sum(v * v for v in vr.values()))
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
            scores[i] += 10 * penalty * dot / norm / 4 if norm else 0.0
    return scores


def split_example(example: dict) -> tuple[list[dict], str]:
    """(prompt messages, reference answer): the last assistant turn is the reference."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    content = messages[last]["content"]
    reference = content if isinstance(content, str) else "".join(c.get("text", "") for c in content)
    return messages[:last], reference


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (128, 128, 128))


# ----------------------------------------------------------------------------- guards: remote code, context length

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def remote_code_allowed(model: str, trust_remote_code: bool = False) -> bool:
    """Whether loading `model` may run the Python files it holds; ValueError for a Hub id without permission.

    A local folder is the user's own checkpoint: its code runs as before. A Hub id would download a repository's
    code and run it on this machine, so it needs an explicit yes. Checked before anything is downloaded.
    """
    if Path(model).is_dir():
        return True
    if not HUB_ID.match(model):
        raise ValueError(f"--model {model!r} is neither a local folder nor a Hub id (owner/name)")
    if not trust_remote_code:
        raise ValueError(
            f"--model {model} is not a local folder, so it names a Hub repository. Loading it runs the Python code "
            "that repository holds (modeling_*.py, processing_*.py) on this machine. Read that code on the Hub, then "
            "pass --trust_remote_code, with --revision <commit> to pin the version you read. (If you meant a local "
            "folder: there is no such folder here.)"
        )
    return True


def load_model(model_id: str, *, trust_remote_code: bool = False, revision: str | None = None, dtype=None):
    """(model in eval mode, processor), after `remote_code_allowed`; `revision` pins a Hub commit."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    trust = remote_code_allowed(model_id, trust_remote_code)
    kwargs = dict(trust_remote_code=trust, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(model_id, **kwargs)


def context_length(model) -> int:
    """The LM's context in tokens (`max_position_embeddings`), prompt and answer together."""
    return model.config.get_text_config().max_position_embeddings


def prompt_length(processor, text: str, limit: int) -> int:
    """Tokens of a templated prompt once its image placeholders are expanded; exact up to `limit`, and cheap past it.

    A 1 MB question takes over a second to tokenize whole. Its first 8 * `limit` characters already hold more than
    `limit` tokens for any real text (tokens average 2-5 characters), so only that head is tokenized; then the
    number returned is the head's count, over the limit. Only a text with unusually long tokens is tokenized whole.
    """
    tokenizer = processor.tokenizer
    head = text[: 8 * limit]
    n = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    if n <= limit and len(head) < len(text):
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # each image placeholder is one token in text and `num_image_tokens` tokens in the model's input
    image_token = getattr(processor, "image_token", None)
    n_images = text.count(image_token) if image_token else 0
    return n + n_images * (getattr(processor, "num_image_tokens", 1) - 1)


# ----------------------------------------------------------------------------- generation and scores


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


Scorer = Callable[[str, str], float | bool | None]  # (prediction, reference) -> score, or None: not applicable


def mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


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
    skipped = Counter({"undecodable": sum(e is None for e in examples)})
    limit = context_length(model) - max_new_tokens
    if limit <= 0:
        context = limit + max_new_tokens
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {context}-token context")
    kept = []  # (templated prompt, images, reference)
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
    prompts = [(text, images) for text, images, _ in kept]
    blind = [(text, [blank_like(i) for i in images]) for text, images in prompts]
    answers = generate_answers(model, processor, prompts, batch_size, max_new_tokens)
    blind_answers = generate_answers(model, processor, blind, batch_size, max_new_tokens)
    references = [reference for _, _, reference in kept]
    cider, blind_cider = cider_d(answers, references), cider_d(blind_answers, references)
    predictions = []
    for reference, answer, guess, score, blind_score in zip(references, answers, blind_answers, cider, blind_cider):
        prediction = {
            "reference": reference,
            "prediction": answer,
            "blind_prediction": guess,
            "exact_match": normalize_answer(answer) == normalize_answer(reference),
            "blind_exact_match": normalize_answer(guess) == normalize_answer(reference),
            "bleu4": bleu4(answer, reference),
            "cider": score,
            "blind_cider": blind_score,
        }
        for name, scorer in scorers.items():
            prediction[name], prediction[f"blind_{name}"] = scorer(answer, reference), scorer(guess, reference)
        predictions.append(prediction)
    n = max(1, len(predictions))
    summary = {
        "examples": len(predictions),
        "exact_match": sum(p["exact_match"] for p in predictions) / n,
        "blind_exact_match": sum(p["blind_exact_match"] for p in predictions) / n,
        "bleu4": sum(p["bleu4"] for p in predictions) / n,
        "cider": sum(cider) / n,
        "blind_cider": sum(blind_cider) / n,
    }
    for name in scorers:  # None (not applicable) is left out of the mean
        summary[name] = mean([p[name] for p in predictions])
        summary[f"blind_{name}"] = mean([p[f"blind_{name}"] for p in predictions])
    summary["skipped"] = {reason: k for reason, k in skipped.items() if k}
    return {"summary": summary, "predictions": predictions}


def load_scorer(spec: str) -> tuple[str, Scorer]:
    """'module:function' -> (function name, function), e.g. 'synthetic:caption_correct'."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--scorer {spec!r}: expected module:function, e.g. synthetic:caption_correct")
    return name, getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------- results on the Hub: model-index

CARD_METRICS = {  # summary key -> (metric type, pretty name)
    "exact_match": ("exact_match", "Exact match"),
    "blind_exact_match": ("blind_exact_match", "Exact match, blind baseline (grey images)"),
    "bleu4": ("bleu", "BLEU-4"),
    "cider": ("cider", "CIDEr-D"),
    "blind_cider": ("blind_cider", "CIDEr-D, blind baseline (grey images)"),
}
SUMMARY_ONLY = {"examples", "skipped"}  # summary keys that are not metrics; any other (a scorer's) is one


def dataset_label(dataset: str) -> str:
    """A Hub id as it is; a local file or folder by its name only: no path of this machine goes on the Hub."""
    return dataset if HUB_ID.match(dataset) and not Path(dataset).exists() else Path(dataset).name


def write_model_index(
    model_dir: str | Path, summary: dict, dataset: str, split: str | None = None, limit: int | None = None
) -> Path:
    """Put `summary`'s scores into `<model_dir>/README.md` as `model-index` metadata; the rest of the card is kept.

    Results of an earlier evaluation on the same dataset and split are replaced, those on other datasets kept.
    """
    from huggingface_hub import EvalResult, ModelCard

    path = Path(model_dir) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\n---\n")
    name = dataset_label(dataset)
    pretty = f"{name} (first {limit} examples)" if limit else name
    metrics = {**CARD_METRICS}
    metrics.update({k: (k, k.replace("_", " ")) for k in summary if k not in metrics and k not in SUMMARY_ONLY})
    results = [
        EvalResult(
            task_type="image-text-to-text",
            dataset_type=name,
            dataset_name=pretty,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(summary[key], 4),
        )
        for key, (metric_type, metric_name) in metrics.items()
        if summary.get(key) is not None
    ]
    ours = (results[0].task_type, name, split) if results else None
    earlier = [r for r in card.data.eval_results or [] if (r.task_type, r.dataset_type, r.dataset_split) != ours]
    card.data.eval_results = earlier + results
    card.data.model_name = card.data.model_name or Path(model_dir).resolve().name
    card.save(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--trust_remote_code", action="store_true", help="needed for a Hub id: runs its code")
    parser.add_argument("--revision", default=None, help="the Hub commit (or branch/tag) to load")
    parser.add_argument("--dataset", required=True, help="any format the data module reads")
    parser.add_argument("--image_root", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--scorer", action="append", default=[], help="module:function, a metric of your own")
    parser.add_argument("--output_dir", default=None, help="default: <model>/eval")
    parser.add_argument(
        "--write_card", action="store_true", help="put the scores into <model>/README.md as model-index metadata"
    )
    parser.add_argument(
        "--push_to_hub", metavar="REPO_ID", default=None,
        help="then upload the model folder (its card with the scores) as training pushes it: eval/ stays local",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        remote_code_allowed(args.model, args.trust_remote_code)  # before any download or data loading
        if (args.write_card or args.push_to_hub) and not Path(args.model).is_dir():
            raise ValueError("--write_card and --push_to_hub work on <model>, so --model must be a local folder")
        scorers = dict(load_scorer(spec) for spec in args.scorer)
    except (ValueError, ImportError, AttributeError) as e:
        parser.error(str(e))

    from data import load_vlm_dataset

    model, processor = load_model(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    dataset = load_vlm_dataset(args.dataset, args.image_root, split=args.split, limit=args.limit)
    examples = [dataset[i] for i in range(len(dataset))]
    result = evaluate(model, processor, examples, args.batch_size, args.max_new_tokens, scorers)
    out = Path(args.output_dir or Path(args.model) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for p in result["predictions"]:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2))
    s = result["summary"]
    extra = "".join(f"  {k} {s[k]:.1%} (blind {s[f'blind_{k}']:.1%})" for k in scorers if s[k] is not None)
    skipped = ", ".join(f"{reason} {k}" for reason, k in s["skipped"].items())
    print(
        f"exact match {s['exact_match']:.1%} (blind {s['blind_exact_match']:.1%})  BLEU-4 {s['bleu4']:.3f}  "
        f"CIDEr {s['cider']:.3f} (blind {s['blind_cider']:.3f}){extra}  |  {s['examples']} examples"
        + (f", skipped: {skipped}" if skipped else "")
    )
    if args.write_card:
        card = write_model_index(args.model, s, args.dataset, args.split, args.limit)
        print(f"scores written to {card.name}'s model-index; push the folder to show them on the Hub")
    if args.push_to_hub:
        from training import push_folder  # the same upload as training's: no checkpoints, args or eval/ folder

        print(f"pushed: {push_folder(Path(args.model), args.push_to_hub)}")
    return result


if __name__ == "__main__":
    main()
