"""Evaluate a checkpoint on a held-out set: answers by batched greedy generation, scored against the references.

    python evaluate.py --model outputs/quickstart/sft --dataset data/sft_test.jsonl --limit 200

Notable:
- Any format the data module reads works. Each example's last assistant turn is the reference; everything before it
  (earlier turns included) is the prompt.
- VQA-style normalised exact match, and for caption-like references BLEU-4 (per sentence) and CIDEr-D (over the set:
  n-grams weighted by how rare they are among the references, so "a photo of" earns little).
- The blind baseline answers the same prompts with blank (grey) images: what the LM guesses from the question alone.
  A model that looks at images must beat it by a wide margin.
- Writes `predictions.jsonl` and `summary.json` to `--output_dir`.
"""

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

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


@torch.no_grad()
def generate_answers(
    model, processor, prompts: list[tuple[list[dict], list]], batch_size: int = 16, max_new_tokens: int = 32
) -> list[str]:
    """Greedy answers for (messages, images) prompts, left-padded in batches."""
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
        chunk = prompts[start : start + batch_size]
        texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m, _ in chunk]
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


def evaluate(model, processor, examples: list[dict], batch_size: int = 16, max_new_tokens: int = 32) -> dict:
    """Score the model and its blind baseline; returns {"summary": {...}, "predictions": [...]}."""
    examples = [e for e in examples if e is not None]
    split = [split_example(e) for e in examples]
    prompts = [(messages, e["images"]) for (messages, _), e in zip(split, examples)]
    blind = [(messages, [blank_like(i) for i in images]) for messages, images in prompts]
    answers = generate_answers(model, processor, prompts, batch_size, max_new_tokens)
    blind_answers = generate_answers(model, processor, blind, batch_size, max_new_tokens)
    references = [reference for _, reference in split]
    cider, blind_cider = cider_d(answers, references), cider_d(blind_answers, references)
    predictions = []
    for (_, reference), answer, guess, score, blind_score in zip(split, answers, blind_answers, cider, blind_cider):
        predictions.append(
            {
                "reference": reference,
                "prediction": answer,
                "blind_prediction": guess,
                "exact_match": normalize_answer(answer) == normalize_answer(reference),
                "blind_exact_match": normalize_answer(guess) == normalize_answer(reference),
                "bleu4": bleu4(answer, reference),
                "cider": score,
                "blind_cider": blind_score,
            }
        )
    n = max(1, len(predictions))
    summary = {
        "examples": len(predictions),
        "exact_match": sum(p["exact_match"] for p in predictions) / n,
        "blind_exact_match": sum(p["blind_exact_match"] for p in predictions) / n,
        "bleu4": sum(p["bleu4"] for p in predictions) / n,
        "cider": sum(cider) / n,
        "blind_cider": sum(blind_cider) / n,
    }
    return {"summary": summary, "predictions": predictions}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, help="any format the data module reads")
    parser.add_argument("--image_root", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--output_dir", default=None, help="default: <model>/eval")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoProcessor

    from data import load_vlm_dataset

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    dataset = load_vlm_dataset(args.dataset, args.image_root, split=args.split, limit=args.limit)
    examples = [dataset[i] for i in range(len(dataset))]
    result = evaluate(model, processor, examples, args.batch_size, args.max_new_tokens)
    out = Path(args.output_dir or Path(args.model) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for p in result["predictions"]:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2))
    s = result["summary"]
    print(
        f"exact match {s['exact_match']:.1%} (blind {s['blind_exact_match']:.1%})  BLEU-4 {s['bleu4']:.3f}  "
        f"CIDEr {s['cider']:.3f} (blind {s['blind_cider']:.3f})"
    )
    return result


if __name__ == "__main__":
    main()
