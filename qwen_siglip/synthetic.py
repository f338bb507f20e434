"""Synthetic coloured-shapes data: the no-download data set the README's first command trains on.

Writes PNGs, stage-1 captions (LLaVA format) and stage-2 questions (minimind-v format) that a tiny random
SigLIP + Qwen2 model learns in a few CPU minutes, while the same model fed blank images stays near chance.

What is notable:
- The layout matches the vision tower. A 32 px image is a 2x2 grid of 16 px cells, each exactly 2x2 of the
  8 px SigLIP patches. Every shape (11-13 px) sits alone inside its own cell, so shapes never overlap or touch,
  and colour, shape, side and count are all local features a 2-layer encoder can pick up (16 image tokens).
- Answers are one canonical word or digit, in English or Chinese, so exact match is meaningful. Colour,
  shape and position ("left"/"right") are asked only of single-shape images; count of images with 1-3.
- Items are planned answer-first: (question kind, answer, language) cycles through every combination and
  is shuffled, then a scene is drawn to fit. Every answer is equally frequent, so knowing the question
  alone gets ~1/3 right (`chance_accuracy`); beating that needs the image.
- Background tint, shape size and offset inside the cell are jittered; test scenes come from their own
  seed stream and any scene identical to a training one is redrawn, so test images are never seen in training.
- Deterministic: each split has its own `random.Random` seeded by a string, which is stable across runs.
- `n_caption_test` adds held-out captions (`caption_test.jsonl`, unseen scenes, 1-3 shapes, both languages);
  `caption_correct` scores a caption right only with every colour, shape, position and count word right, in order.
"""

import argparse
import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

# Far apart in RGB and from the light background. PIL draws without anti-aliasing, so pixels are exact.
COLOURS = {"red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 60, 220), "yellow": (235, 190, 0)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # the 2x2 grid in reading order
KINDS = ("colour", "shape", "position", "count")
LANGS = ("en", "zh")
ANSWERS = {"colour": list(COLOURS), "shape": list(SHAPES), "position": ["left", "right"], "count": ["1", "2", "3"]}
ZH = (
    {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
    | {"circle": "圆形", "square": "正方形", "triangle": "三角形", "left": "左边", "right": "右边"}
    | {"top left": "左上方", "top right": "右上方", "bottom left": "左下方", "bottom right": "右下方"}
)
NUMBERS = {2: ("two", "两"), 3: ("three", "三")}  # (English, Chinese), for captions
QUESTIONS = {
    ("colour", "en"): ["What colour is the shape?", "What color is the shape?", "Which colour is the object?"],
    ("colour", "zh"): ["这个形状是什么颜色？", "图中的形状是什么颜色？"],
    ("shape", "en"): ["What shape is it?", "Which shape is shown?"],
    ("shape", "zh"): ["这是什么形状？", "图中是什么形状？"],
    ("position", "en"): ["Is the shape on the left or the right?", "Which side is the shape on?"],
    ("position", "zh"): ["这个形状在左边还是右边？", "形状在哪一边？"],
    ("count", "en"): ["How many shapes are there?", "How many shapes do you see?"],
    ("count", "zh"): ["图中有几个形状？", "有多少个形状？"],
}
QUESTION_TYPE = {q: key for key, qs in QUESTIONS.items() for q in qs}  # what a blind guesser knows
DESCRIBE = {
    "en": ["Describe the image.", "What is in this picture?", "Describe the shapes you see.", "Give a short caption."],
    "zh": ["描述这张图片。", "图片里有什么？", "请简单描述这张图。"],
}
SFT_CAPTIONS = 0.5  # captions added to the stage-2 train split, as a share of its questions (none in test)
MULTI_TURN = 0.25  # share of single-shape train items that get a second question about the same image
IMAGE_SIZE = 32  # pixels; a multiple of 2 x the patch size (see above)
PUNCTUATION = ".,!?;:。，！？；：、 \t\n"


class Obj(NamedTuple):
    colour: str
    shape: str
    cell: int  # index into CELLS
    box: tuple[int, int, int, int]  # inclusive pixel bounds x0, y0, x1, y1


Scene = tuple[tuple[int, int, int], tuple[Obj, ...]]  # (background RGB, shapes in cell order)


def random_scene(rng: random.Random, image_size: int, n: int = 1, colour=None, shape=None, position=None) -> Scene:
    """n shapes in distinct cells; attributes left as None are drawn at random."""
    cell = image_size // 2
    cells = [c for c in range(4) if position is None or CELLS[c].endswith(position)]
    objs = []
    for c in sorted(rng.sample(cells, n)):
        s = rng.randint(round(0.7 * cell), round(0.8 * cell))
        # >= 1 px margin inside the cell keeps neighbouring shapes apart
        x0 = (c % 2) * cell + rng.randint(1, cell - s - 1)
        y0 = (c // 2) * cell + rng.randint(1, cell - s - 1)
        obj_colour = colour or rng.choice(ANSWERS["colour"])
        objs.append(Obj(obj_colour, shape or rng.choice(SHAPES), c, (x0, y0, x0 + s - 1, y0 + s - 1)))
    background = tuple(rng.randint(230, 255) for _ in range(3))  # light, slightly tinted: a nuisance
    return background, tuple(objs)


def draw(scene: Scene, image_size: int) -> Image.Image:
    background, objs = scene
    img = Image.new("RGB", (image_size, image_size), background)
    pen = ImageDraw.Draw(img)
    for obj in objs:
        x0, y0, x1, y1 = obj.box
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            pen.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            pen.rectangle(obj.box, fill=fill)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def answer(scene: Scene, kind: str, lang: str) -> str:
    """The canonical answer, read off the scene (the single source of truth for every label)."""
    objs = scene[1]
    first = objs[0]
    side = "left" if first.cell % 2 == 0 else "right"
    value = {"colour": first.colour, "shape": first.shape, "position": side, "count": str(len(objs))}[kind]
    return ZH.get(value, value) if lang == "zh" else value


def caption(scene: Scene, lang: str) -> str:
    objs = scene[1]
    n = len(objs)
    if lang == "en":
        parts = [f"a {o.colour} {o.shape} on the {CELLS[o.cell]}" for o in objs]
        text = ", ".join(parts[:-1]) + " and " + parts[-1] if n > 1 else parts[0]
        return f"{NUMBERS[n][0]} shapes: {text}" if n > 1 else text
    text = "，".join(f"{ZH[CELLS[o.cell]]}有一个{ZH[o.colour]}{ZH[o.shape]}" for o in objs)
    return f"{NUMBERS[n][1]}个形状：{text}" if n > 1 else text


def plan(n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """n (kind, answer, language) triples, cycling all combinations so answers are balanced."""
    items = []
    for i in range(n):
        kind, j = KINDS[i % len(KINDS)], i // len(KINDS)
        values = ANSWERS[kind]
        items.append((kind, values[j % len(values)], LANGS[j // len(values) % len(LANGS)]))
    rng.shuffle(items)
    return items


def scene_for(rng: random.Random, image_size: int, kind: str, value: str) -> Scene:
    if kind == "count":
        return random_scene(rng, image_size, n=int(value))
    return random_scene(rng, image_size, **{kind: value})


def sft_row(rng: random.Random, scene: Scene, image: str, kind: str, lang: str, multi_turn: bool) -> dict:
    kinds = [kind]
    if multi_turn and len(scene[1]) == 1:  # every kind has an answer for a single shape
        kinds.append(rng.choice([k for k in KINDS if k != kind]))
    conversation = []
    for i, k in enumerate(kinds):
        question = ("<image>\n" if i == 0 else "") + rng.choice(QUESTIONS[k, lang])
        conversation += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer(scene, k, lang)},
        ]
    return {"conversations": conversation, "image": image}


def _writer(out: Path, image_size: int):
    """save(scene, name) -> the image's path relative to `out`, after drawing it into out/images/."""

    def save(scene: Scene, name: str) -> str:
        draw(scene, image_size).save(out / "images" / f"{name}.png")
        return f"images/{name}.png"

    return save


def _caption_turns(rng: random.Random, scene: Scene, lang: str, llava: bool = False) -> list[dict]:
    """A describe-the-image prompt and the scene's caption, in LLaVA's (from/value) or role/content form."""
    prompt, reply = "<image>\n" + rng.choice(DESCRIBE[lang]), caption(scene, lang)
    if llava:
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _pretrain(out: Path, n: int, seed: int, save, seen: set, image_size: int) -> Path:
    """Stage-1 captions (LLaVA json) of 1-3 shapes, English or Chinese."""
    rng, rows = random.Random(f"pretrain-{seed}"), []
    for i in range(n):
        scene, lang = random_scene(rng, image_size, n=rng.randint(1, 3)), rng.choice(LANGS)
        seen.add(scene)
        rows.append({"id": f"pretrain_{i:06d}", "image": save(scene, f"pretrain_{i:06d}"),
                     "conversations": _caption_turns(rng, scene, lang, llava=True)})  # fmt: skip
    path = out / "pretrain.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _sft(out: Path, split: str, n: int, seed: int, save, seen: set, image_size: int) -> Path:
    """Stage-2 questions (minimind-v jsonl), planned answer-first; the train split gets some captions too."""
    rng, rows = random.Random(f"{split}-{seed}"), []  # a separate stream: test draws never mirror train draws
    for i, (kind, value, lang) in enumerate(plan(n, rng)):
        scene = scene_for(rng, image_size, kind, value)
        while split == "test" and scene in seen:
            scene = scene_for(rng, image_size, kind, value)
        if split == "train":
            seen.add(scene)
        multi_turn = split == "train" and rng.random() < MULTI_TURN
        rows.append(sft_row(rng, scene, save(scene, f"{split}_{i:06d}"), kind, lang, multi_turn))
    if split == "train":  # some captions too, or stage 2 would forget how to describe an image
        for i in range(n, n + round(n * SFT_CAPTIONS)):
            scene, lang = random_scene(rng, image_size, n=rng.randint(1, 3)), rng.choice(LANGS)
            seen.add(scene)
            rows.append({"conversations": _caption_turns(rng, scene, lang), "image": save(scene, f"{split}_{i:06d}")})
        rng.shuffle(rows)
    return _write_jsonl(out / f"sft_{split}.jsonl", rows)


def _caption_test(out: Path, n: int, seed: int, save, seen: set, image_size: int) -> Path:
    """Held-out captions of unseen scenes: every count, both languages."""
    rng, rows = random.Random(f"caption-test-{seed}"), []
    for i in range(n):
        scene, lang = random_scene(rng, image_size, n=1 + i % 3), LANGS[i // 3 % 2]
        while scene in seen:
            scene = random_scene(rng, image_size, n=1 + i % 3)
        rows.append({"conversations": _caption_turns(rng, scene, lang), "image": save(scene, f"caption_test_{i:06d}")})
    return _write_jsonl(out / "caption_test.jsonl", rows)


def make_shapes_dataset(
    out_dir: str | Path,
    *,
    n_pretrain: int,
    n_sft: int,
    n_test: int,
    n_caption_test: int = 0,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the splits; `n_caption_test` > 0 adds `caption_test` (held-out captions, half English, half Chinese)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    save, seen = _writer(out, image_size), set()  # seen: training scenes, which a test scene must not equal
    paths = {"pretrain": _pretrain(out, n_pretrain, seed, save, seen, image_size)}
    for split, n in (("train", n_sft), ("test", n_test)):
        paths[f"sft_{split}"] = _sft(out, split, n, seed, save, seen, image_size)
    if n_caption_test:
        paths["caption_test"] = _caption_test(out, n_caption_test, seed, save, seen, image_size)
    return {**paths, "images": out / "images"}


def conversations(path: str | Path) -> list[list[str]]:
    """The turn texts of every record in a pretrain .json (LLaVA) or sft .jsonl (minimind-v) file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
    return [[turn.get("value", turn.get("content")) for turn in row["conversations"]] for row in rows]


def corpus_texts(paths: Iterable[str | Path]) -> list[str]:
    """Every prompt and answer string, as stored. Directories are skipped, so `paths.values()` works."""
    return [text for path in paths if not Path(path).is_dir() for turns in conversations(path) for text in turns]


def normalize_answer(s: str) -> str:
    return s.strip().lower().rstrip(PUNCTUATION)


# Every word a caption can get wrong, English and Chinese; longest first, so 三角形 (triangle) is never read as 三 (3).
CAPTION_WORDS = sorted(
    {*COLOURS, *SHAPES, *CELLS, *(en for en, _ in NUMBERS.values())}
    | {ZH[w] for w in (*COLOURS, *SHAPES, *CELLS)}
    | {zh for _, zh in NUMBERS.values()},
    key=len,
    reverse=True,
)
CAPTION_WORD = re.compile("|".join(rf"\b{re.escape(w)}\b" if w.isascii() else re.escape(w) for w in CAPTION_WORDS))


def caption_words(text: str) -> list[str]:
    """The colour, shape, position and count words of a caption, in order: what a caption can get right."""
    return CAPTION_WORD.findall(text.lower())


def caption_correct(prediction: str, reference: str) -> bool:
    """True when the predicted caption has every colour, shape, position and count word of the reference, in order,
    and no other (English or Chinese); a scorer for `evaluate.py --scorer synthetic:caption_correct`."""
    return caption_words(prediction) == caption_words(reference)


def chance_accuracy(test_path: str | Path) -> float:
    """Accuracy of the best blind guesser: the most common answer for each question type (kind, language)."""
    answers = defaultdict(Counter)
    for turns in conversations(test_path):
        for question, reply in zip(turns[::2], turns[1::2]):
            question = question.removeprefix("<image>\n")
            answers[QUESTION_TYPE.get(question, question)][normalize_answer(reply)] += 1
    return sum(max(c.values()) for c in answers.values()) / sum(sum(c.values()) for c in answers.values())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-pretrain", type=int, default=2000)
    parser.add_argument("--n-sft", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--n-caption-test", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    paths = make_shapes_dataset(args.out, **{k: v for k, v in vars(args).items() if k != "out"})
    print(f"wrote {args.n_pretrain + args.n_sft + args.n_test} examples in {time.perf_counter() - start:.1f}s")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    print(f"blind chance accuracy on the test split: {chance_accuracy(paths['sft_test']):.3f}")
