"""Answer metrics: VQA-style normalised exact match, sentence BLEU-4 and CIDEr-D, English and Chinese.

Notable:
- `normalize_answer`: lowercase, ASCII and CJK punctuation and English articles out, so 'The Red.' == 'red'.
- Chinese has no spaces: BLEU and CIDEr count its characters, English its words.
- CIDEr-D is over a set (n-grams weighted by how rare they are among the references), so "a photo of" earns little.
"""

import math
import re
from collections import Counter

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
