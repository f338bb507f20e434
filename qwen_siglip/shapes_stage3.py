"""Stage 3 on the embedded default: the data `quickstart.py --stage3 dpo|grpo` trains on, and how it is scored.

Notable:
- Everything stage 3 trains on is drawn from the training configurations (`synthetic.partition(seed).train`), in
  new images: never a held-out or reserved configuration. No rejected caption names a reserved (colour, shape) pair
  either, so the unseen-pair split stays unseen in words as well as in pictures.
- DPO pairs (RLAIF-V's idea): chosen is the scene's caption, rejected the caption of the same scene with exactly one
  thing changed, named in the pair's `attribute` column: one shape's colour, its shape, its cell, or one more shape
  that is not there (a hallucinated object, which changes the count too). The four are cycled, so each is a quarter.
- GRPO prompts: questions of one kind (the one stage 2 gets most wrong on the held-out splits, `weakest_kind`), about
  one-shape training scenes, answers balanced, English and Chinese, as stage 2 asked them.
- The matched SFT baseline trains on the same records (the chosen caption; the question and its answer), from the
  same checkpoint, for the same optimizer steps and examples per step: `budget` reads both from each run's model card.
- `hallucinated(prediction, reference)` lists what a caption names that the picture does not hold (the reference
  caption says what the picture holds): a colour, a shape, a cell with no shape in it, a coloured shape (colour and
  shape together), or a count (a wrong number word, or more shapes described than there are). Attributes only: two
  shapes' cells swapped name nothing absent. Leaving something out is not a
  hallucination; `synthetic.caption_correct` counts that as wrong. `hallucination` is the `--scorer` form.
"""

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from qwen_siglip import synthetic
from qwen_siglip.synthetic import CELLS, COLOURS, NUMBERS, RESERVED_PAIRS, SHAPES, ZH, Config, Obj

ATTRIBUTES = ("colour", "shape", "position", "object")  # what a rejected caption changes (`corrupt`)
HALLUCINATIONS = ("colour", "shape", "position", "object", "count")  # what `hallucinated` looks for

# Every caption word, English and Chinese -> (what it says, the canonical English word or number).
WORDS = {w: ("colour", w) for w in COLOURS} | {w: ("shape", w) for w in SHAPES} | {w: ("cell", w) for w in CELLS}
WORDS |= {ZH[w]: kind_word for w, kind_word in list(WORDS.items())}
WORDS |= {word: ("count", n) for n, pair in NUMBERS.items() for word in pair}


def caption_parts(text: str) -> tuple[int | None, list[dict]]:
    """(the number word's count or None, the shapes described in order as {colour, shape, cell} with whatever each
    names). A word of a kind the current shape already has starts the next shape: English says colour, shape, cell
    and Chinese cell, colour, shape, so either order splits right."""
    count, shapes = None, []
    for word in synthetic.caption_words(text):
        kind, value = WORDS[word]
        if kind == "count":
            count = value if count is None else count
            continue
        if not shapes or kind in shapes[-1]:
            shapes.append({})
        shapes[-1][kind] = value
    return count, shapes


def described_config(text: str) -> Config | None:
    """The configuration a well-formed caption describes (None if any shape lacks its colour, shape or cell)."""
    _, shapes = caption_parts(text)
    if not shapes or any(len(s) != 3 for s in shapes):
        return None
    return tuple(sorted((CELLS.index(s["cell"]), s["colour"], s["shape"]) for s in shapes))


def hallucinated(prediction: str, reference: str) -> list[str]:
    """What `prediction` names that the picture `reference` describes does not hold, among HALLUCINATIONS."""
    ref_count, ref = caption_parts(reference)
    count, pred = caption_parts(prediction)
    held = {kind: {s.get(kind) for s in ref} for kind in ("colour", "shape", "cell")}
    pairs = {(s.get("colour"), s.get("shape")) for s in ref}
    found = {name for kind, name in (("colour", "colour"), ("shape", "shape"), ("cell", "position"))
             if any(kind in s and s[kind] not in held[kind] for s in pred)}  # fmt: skip
    if any({"colour", "shape"} <= s.keys() and (s["colour"], s["shape"]) not in pairs for s in pred):
        found.add("object")
    if (count is not None and count != (ref_count or 1)) or len(pred) > len(ref):
        found.add("count")
    return [kind for kind in HALLUCINATIONS if kind in found]


def hallucination(prediction: str, reference: str) -> bool:
    """True when a caption names anything the picture does not hold; an `evaluate_vlm.py --scorer`."""
    return bool(hallucinated(prediction, reference))


# ----------------------------------------------------------------------------- DPO pairs


def allowed(colour: str, shape: str) -> bool:
    return (colour, shape) not in RESERVED_PAIRS


def corrupt(config: Config, attribute: str, rng: random.Random) -> Config | None:
    """`config` with exactly one `attribute` changed, never into a reserved pair; None where it cannot be (an extra
    shape in a three-shape scene: captions count to three)."""
    parts, i = list(config), rng.randrange(len(config))
    cell, colour, shape = parts[i]
    free = [c for c in range(len(CELLS)) if c not in {p[0] for p in parts}]
    if attribute == "colour":
        parts[i] = (cell, rng.choice([c for c in COLOURS if c != colour and allowed(c, shape)]), shape)
    elif attribute == "shape":
        parts[i] = (cell, colour, rng.choice([s for s in SHAPES if s != shape and allowed(colour, s)]))
    elif attribute == "position":
        parts[i] = (rng.choice(free), colour, shape)
    elif attribute == "object":
        if len(parts) == 3:
            return None
        parts.append((rng.choice(free), *rng.choice([p for p in synthetic.PAIRS if allowed(*p)])))
    else:
        raise ValueError(f"unknown attribute {attribute!r}: expected one of {ATTRIBUTES}")
    return tuple(sorted(parts))


def caption_of(config: Config, lang: str) -> str:
    """The caption synthetic.py writes for a configuration (boxes play no part in it)."""
    objs = tuple(Obj(colour, shape, cell, (0, 0, 0, 0)) for cell, colour, shape in config)
    return synthetic.caption(((0, 0, 0), objs), lang)


def training_pool(seed: int) -> dict:
    """synthetic.index over the configurations training may draw: never a held-out or reserved one."""
    return synthetic.index(synthetic.partition(seed).train)


def write_pairs(out: Path, n: int, seed: int, image_size: int = synthetic.IMAGE_SIZE) -> dict[str, Path]:
    """`n` preference pairs of new training-configuration scenes (TRL format + `attribute`, in out/pairs.jsonl) and
    the same prompts with the chosen caption as SFT records (out/pairs_sft.jsonl), images in out/images."""
    rng, pool = random.Random(f"stage3-pairs-{seed}"), training_pool(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs, sft = [], []
    for i in range(n):
        attribute, lang = ATTRIBUTES[i % len(ATTRIBUTES)], synthetic.LANGS[i // len(ATTRIBUTES) % 2]
        counts = ["1", "2"] if attribute == "object" else ["1", "2", "3"]  # room for one more shape
        scene = synthetic.render(rng, rng.choice(pool["count", rng.choice(counts)]), image_size)
        config, image = synthetic.configuration(scene), f"images/pair_{i:06d}.png"
        synthetic.draw(scene, image_size).save(out / image)
        prompt, chosen = synthetic.caption_turns(rng, scene, lang)
        rejected = caption_of(corrupt(config, attribute, rng), lang)
        pairs.append({"prompt": [prompt], "chosen": [chosen], "rejected": [{**chosen, "content": rejected}],
                      "images": [image], "attribute": attribute})  # fmt: skip
        sft.append({"conversations": [prompt, chosen], "image": image})
    write = synthetic.write_jsonl
    return {"pairs": write(out / "pairs.jsonl", pairs), "sft": write(out / "pairs_sft.jsonl", sft)}


# ----------------------------------------------------------------------------- GRPO prompts


def write_prompts(out: Path, n: int, kind: str, seed: int, image_size: int = synthetic.IMAGE_SIZE) -> Path:
    """`n` one-turn questions of `kind` about new training-configuration scenes (minimind-v jsonl, out/prompts.jsonl,
    images in out/images): the GRPO prompts, and the matched SFT baseline's records."""
    rng, pool = random.Random(f"stage3-prompts-{seed}"), training_pool(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (k, value, lang) in enumerate(synthetic.plan(n, rng, {kind: synthetic.ANSWERS[kind]})):
        scene, image = synthetic.render(rng, rng.choice(pool[k, value]), image_size), f"images/prompt_{i:06d}.png"
        synthetic.draw(scene, image_size).save(out / image)
        rows.append(synthetic.sft_row(rng, scene, image, k, lang, multi_turn=False))
    return synthetic.write_jsonl(out / "prompts.jsonl", rows)


def kind_scores(predictions: list[dict]) -> dict[str, float]:
    """Exact match per question kind (colour, shape, position, count) over evaluation predictions."""
    right = defaultdict(list)
    for p in predictions:
        kind, _ = synthetic.QUESTION_TYPE[p["question"].removeprefix("<image>\n")]
        right[kind].append(bool(p["exact_match"]))
    return {kind: sum(r) / len(r) for kind, r in right.items()}


def weakest_kind(per_split: dict[str, dict[str, float]]) -> str:
    """The question kind with the most wrong answers over the held-out splits (`kind_scores` of each); a tie goes
    to the first kind in synthetic.KINDS."""
    wrong = Counter({kind: 0.0 for kind in synthetic.KINDS})
    for scores in per_split.values():
        wrong.update({kind: 1 - score for kind, score in scores.items()})
    return max(synthetic.KINDS, key=lambda kind: wrong[kind])


# ----------------------------------------------------------------------------- scoring


def score_heldout(checkpoint: Path, data: dict[str, Path], tasks: dict[str, int], out: Path) -> dict:
    """Greedy answers of `checkpoint` on every held-out split's questions and captions (`tasks`: task -> max new
    tokens), without blind baselines (stage 2's table has them); predictions in out/<split>/<task>/. Returns
    `summarize`'s scores."""
    import torch

    from qwen_siglip.data import load_vlm_dataset
    from qwen_siglip.evaluation import evaluate
    from qwen_siglip.inference import load_model

    model, processor = load_model(str(checkpoint))
    found = {}
    for split in synthetic.SPLITS:
        for task, tokens in tasks.items():
            dataset = load_vlm_dataset(str(data[synthetic.heldout_name(split, task)]), split="test")
            with torch.no_grad():
                result = evaluate(model, processor, [dataset[i] for i in range(len(dataset))], 128, tokens, blinds={})
            (out / split / task).mkdir(parents=True, exist_ok=True)
            synthetic.write_jsonl(out / split / task / "predictions.jsonl", result["predictions"])
            found.setdefault(split, {})[task] = result["predictions"]
    return summarize(found)


def read_predictions(folder: Path, tasks) -> dict:
    """{split: {task: predictions}} from folder/<split>/<task>/predictions.jsonl (evaluate_vlm.py's files)."""

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    return {
        split: {task: rows(folder / split / task / "predictions.jsonl") for task in tasks}
        for split in synthetic.SPLITS
    }


def summarize(predictions: dict) -> dict:
    """{split: {questions, <kind> for each question kind, captions, hallucination, examples}}: exact match, exact
    match per kind, captions right (`synthetic.caption_correct`) and captions naming something not in the picture."""
    scores = {}
    for split, tasks in predictions.items():
        questions, captions = tasks["questions"], tasks["captions"]
        scores[split] = {"questions": sum(p["exact_match"] for p in questions) / len(questions),
                         **kind_scores(questions),
                         "captions": sum(synthetic.caption_correct(p["prediction"], p["reference"])
                                         for p in captions) / len(captions),
                         "hallucination": sum(hallucination(p["prediction"], p["reference"])
                                              for p in captions) / len(captions),
                         "examples": [len(questions), len(captions)]}  # fmt: skip
    return scores


# ----------------------------------------------------------------------------- the budget


def card_settings(run: Path) -> dict[str, str]:
    """The settings table of a finished run's model card (card.settings_table: its real arguments and state)."""
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", (run / "README.md").read_text(), re.MULTILINE))


def budget(run: Path) -> dict[str, int]:
    """{steps, examples}: the optimizer steps a finished run took and the training records it saw, from its model
    card. A GRPO step's global batch counts answers, `num_generations` per prompt: its records are the prompts."""
    rows = card_settings(run)
    steps, batch = int(rows["epochs / steps"].split(" / ")[1]), int(rows["global batch"])
    per_prompt = int(rows.get("answers per prompt / max answer tokens", "1 / 0").split(" / ")[0])
    return {"steps": steps, "examples": steps * batch // per_prompt}
