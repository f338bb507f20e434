"""Evaluate a checkpoint on a held-out set: answers by batched greedy generation, scored against the references.

    python evaluate.py --model outputs/quickstart/sft --dataset data/sft_test.jsonl --limit 200

Notable:
- Any format the data module reads works. Each example's last assistant turn is the reference; everything before it
  (earlier turns included) is the prompt.
- VQA-style normalised exact match, and BLEU-4 for caption-like references.
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


def bleu4(candidate: str, reference: str) -> float:
    """Sentence BLEU-4 with add-one smoothing on whitespace tokens (characters for CJK text)."""

    def tokens(s: str) -> list[str]:
        s = normalize_answer(s)
        return list(s.replace(" ", "")) if re.search(r"[\u4e00-\u9fff]", s) else s.split()

    cand, ref = tokens(candidate), tokens(reference)
    if not cand:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        c = Counter(tuple(cand[i : i + n]) for i in range(len(cand) - n + 1))
        r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        overlap = sum(min(k, r[g]) for g, k in c.items())
        log_precision += math.log((overlap + 1) / (max(sum(c.values()), 0) + 1)) / 4
    brevity = min(1.0, math.exp(1 - len(ref) / len(cand)))
    return brevity * math.exp(log_precision)


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
    predictions = []
    for (_, reference), answer, guess in zip(split, answers, blind_answers):
        predictions.append(
            {
                "reference": reference,
                "prediction": answer,
                "blind_prediction": guess,
                "exact_match": normalize_answer(answer) == normalize_answer(reference),
                "blind_exact_match": normalize_answer(guess) == normalize_answer(reference),
                "bleu4": bleu4(answer, reference),
            }
        )
    n = max(1, len(predictions))
    summary = {
        "examples": len(predictions),
        "exact_match": sum(p["exact_match"] for p in predictions) / n,
        "blind_exact_match": sum(p["blind_exact_match"] for p in predictions) / n,
        "bleu4": sum(p["bleu4"] for p in predictions) / n,
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
    result = evaluate(model, processor, [dataset[i] for i in range(len(dataset))], args.batch_size, args.max_new_tokens)
    out = Path(args.output_dir or Path(args.model) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for p in result["predictions"]:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2))
    s = result["summary"]
    print(f"exact match {s['exact_match']:.1%}  blind baseline {s['blind_exact_match']:.1%}  BLEU-4 {s['bleu4']:.3f}")
    return result


if __name__ == "__main__":
    main()
