"""Synthetic coloured-shapes data: the no-download data set the README's first command trains on.

Writes PNGs, stage-1 captions (LLaVA format), stage-2 questions (minimind-v format) and three held-out splits that
a tiny random SigLIP + Qwen2 model is scored on after a few CPU minutes of training.

What is notable:
- The layout matches the vision tower. A 32 px image is a 2x2 grid of 16 px cells, each exactly 2x2 of the
  8 px SigLIP patches. Every shape (11-13 px) sits alone inside its own cell, so shapes never overlap or touch,
  and colour, shape, side and count are all local features a 2-layer encoder can pick up (16 image tokens).
- A scene's *configuration* is what it shows with the jitter taken away: the occupied cells and the colour and
  shape in each (`configuration`; 48 with one shape, 864 with two, 6,912 with three). Background tint, shape size
  and offset inside the cell are jitter. Every split is drawn from a named set of configurations (`partition`),
  so what a held-out split claims is true by construction, and a test checks it from the pixels:
  - `seen`: configurations training drew (the in-distribution reference);
  - `unseen-layout`: configurations no training stage draws, each of whose (cell, colour, shape) parts training
    does show: a share of the two- and three-shape ones, and every pair alone in one cell it never occupies alone
    in training (new arrangements of known parts);
  - `unseen-pair`: scenes holding a `RESERVED_PAIRS` (colour, shape) pair, which nothing in training holds
    (systematic generalisation, as CLEVR-CoGenT: blue things and triangles, never a blue triangle).
- Answers are one canonical word or digit, in English or Chinese, so exact match is meaningful. Colour,
  shape and position ("left"/"right") are asked only of single-shape images; count of images with 1-3.
- Items are planned answer-first: (question kind, answer, language) cycles through every combination the split
  can draw and is shuffled, then a configuration is drawn to fit. Answers are balanced, so knowing the question
  alone gets about a third right (`chance_accuracy`); beating that needs the image.
- Deterministic: each split has its own `random.Random` seeded by a string, which is stable across runs.
- `caption_correct` scores a caption right only with every colour, shape, position and count word right, in
  order; `empty_scene` is a shape-free image on a training background, a blind baseline for `evaluate_vlm.py`.
"""

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import combinations, product
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
DESCRIBE = {
    "en": ["Describe the image.", "What is in this picture?", "Describe the shapes you see.", "Give a short caption."],
    "zh": ["描述这张图片。", "图片里有什么？", "请简单描述这张图。"],
}
# What a blind guesser knows: the question's type, (kind, language); every describe prompt is ("caption", language).
QUESTION_TYPE = {q: key for key, qs in QUESTIONS.items() for q in qs}
QUESTION_TYPE |= {prompt: ("caption", lang) for lang, prompts in DESCRIBE.items() for prompt in prompts}
SFT_CAPTIONS = 0.5  # captions added to the stage-2 train split, as a share of its questions
MULTI_TURN = 0.25  # share of single-shape train items that get a second question about the same image
IMAGE_SIZE = 32  # pixels; a multiple of 2 x the patch size (see above)
PUNCTUATION = ".,!?;:。，！？；：、 \t\n"

SPLITS = ("seen", "unseen-layout", "unseen-pair")  # the held-out splits, in the order they are reported
GATED = "unseen-layout"  # the split `make test` gates; its files keep the plain names sft_test / caption_test
RESERVED_PAIRS = (("blue", "triangle"), ("yellow", "circle"))  # never drawn in training: the unseen-pair split
LAYOUT_SHARE = 0.1  # of the two- and three-shape configurations without a reserved pair, kept for unseen-layout

Part = tuple[int, str, str]  # (cell index into CELLS, colour, shape)
Config = tuple[Part, ...]  # a scene's configuration: one part per occupied cell, in cell order


class Obj(NamedTuple):
    colour: str
    shape: str
    cell: int  # index into CELLS
    box: tuple[int, int, int, int]  # inclusive pixel bounds x0, y0, x1, y1


Scene = tuple[tuple[int, int, int], tuple[Obj, ...]]  # (background RGB, shapes in cell order)


def configuration(scene: Scene) -> Config:
    """What a scene shows, jitter aside: (cell, colour, shape) of every shape, in cell order."""
    return tuple((obj.cell, obj.colour, obj.shape) for obj in scene[1])


PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
CONFIGS: list[Config] = [  # every configuration of 1-3 shapes, in a fixed order
    tuple((cell, *pair) for cell, pair in zip(cells, pairs))
    for n in (1, 2, 3)
    for cells in combinations(range(len(CELLS)), n)
    for pairs in product(PAIRS, repeat=n)
]


def has_reserved_pair(config: Config) -> bool:
    return any((colour, shape) in RESERVED_PAIRS for _, colour, shape in config)


class Partition(NamedTuple):
    train: list[Config]  # what training stages may draw
    unseen_layout: list[Config]  # reserved arrangements of training's parts
    unseen_pair: list[Config]  # every configuration holding a reserved pair


def partition(seed: int) -> Partition:
    """Split every configuration between training and the two unseen splits, fixed by the seed."""
    rng = random.Random(f"partition-{seed}")
    pairs = [pair for pair in PAIRS if pair not in RESERVED_PAIRS]
    # Each pair alone in one cell, the cells cycling: consecutive cells alternate sides, so every colour and every
    # shape is held out on the left and on the right, and position questions stay balanced.
    start = rng.randrange(len(CELLS))
    alone = {((start + i) % len(CELLS), *pair) for i, pair in enumerate(pairs)}
    multi = [c for c in CONFIGS if len(c) > 1 and not has_reserved_pair(c)]
    layout = {(part,) for part in alone} | set(rng.sample(multi, round(LAYOUT_SHARE * len(multi))))
    train = [c for c in CONFIGS if not has_reserved_pair(c) and c not in layout]
    return Partition(train, sorted(layout), [c for c in CONFIGS if has_reserved_pair(c)])


def side(cell: int) -> str:
    return "left" if cell % 2 == 0 else "right"


def index(configs: Iterable[Config]) -> dict[tuple[str, str], list[Config]]:
    """(question kind, answer) -> the configurations that give that answer, in a fixed order. Colour, shape and
    position are asked of one-shape scenes only; ("count", n) lists every n-shape configuration."""
    found = defaultdict(list)
    for config in sorted(configs):  # sorted: a set's order changes between processes
        found["count", str(len(config))].append(config)
        if len(config) == 1:
            ((cell, colour, shape),) = config
            for key in (("colour", colour), ("shape", shape), ("position", side(cell))):
                found[key].append(config)
    return dict(found)


def background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(230, 255) for _ in range(3))  # light, slightly tinted: a nuisance


def render(rng: random.Random, config: Config, image_size: int) -> Scene:
    """A scene of `config` with its jitter drawn: background tint, and each shape's size and offset in its cell."""
    cell = image_size // 2
    objs = []
    for c, colour, shape in config:
        s = rng.randint(round(0.7 * cell), round(0.8 * cell))
        # >= 1 px margin inside the cell keeps neighbouring shapes apart
        x0 = (c % 2) * cell + rng.randint(1, cell - s - 1)
        y0 = (c // 2) * cell + rng.randint(1, cell - s - 1)
        objs.append(Obj(colour, shape, c, (x0, y0, x0 + s - 1, y0 + s - 1)))
    return background(rng), tuple(objs)


def draw(scene: Scene, image_size: int) -> Image.Image:
    bg, objs = scene
    img = Image.new("RGB", (image_size, image_size), bg)
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


def empty_scene(image: Image.Image, index: int) -> Image.Image:
    """A shape-free image on a training background (a tint `render` draws): the blind baseline that looks like the
    training images, for `evaluate_vlm.py --blind qwen_siglip.synthetic:empty_scene`."""
    return Image.new("RGB", image.size, background(random.Random(f"empty-{index}")))


def answer(scene: Scene, kind: str, lang: str) -> str:
    """The canonical answer, read off the scene (the single source of truth for every label)."""
    first = scene[1][0]
    value = {"colour": first.colour, "shape": first.shape, "position": side(first.cell), "count": str(len(scene[1]))}
    return ZH.get(value[kind], value[kind]) if lang == "zh" else value[kind]


def caption(scene: Scene, lang: str) -> str:
    objs = scene[1]
    n = len(objs)
    if lang == "en":
        parts = [f"a {o.colour} {o.shape} on the {CELLS[o.cell]}" for o in objs]
        text = ", ".join(parts[:-1]) + " and " + parts[-1] if n > 1 else parts[0]
        return f"{NUMBERS[n][0]} shapes: {text}" if n > 1 else text
    text = "，".join(f"{ZH[CELLS[o.cell]]}有一个{ZH[o.colour]}{ZH[o.shape]}" for o in objs)
    return f"{NUMBERS[n][1]}个形状：{text}" if n > 1 else text


def plan(n: int, rng: random.Random, answers: dict[str, list[str]] = ANSWERS) -> list[tuple[str, str, str]]:
    """n (kind, answer, language) triples, cycling every combination of `answers` so answers are balanced."""
    kinds, items = [k for k in KINDS if answers.get(k)], []
    for i in range(n):
        kind, j = kinds[i % len(kinds)], i // len(kinds)
        values = answers[kind]
        items.append((kind, values[j % len(values)], LANGS[j // len(values) % len(LANGS)]))
    rng.shuffle(items)
    return items


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


def caption_turns(rng: random.Random, scene: Scene, lang: str, llava: bool = False) -> list[dict]:
    """A describe-the-image prompt and the scene's caption, in LLaVA's (from/value) or role/content form."""
    prompt, reply = "<image>\n" + rng.choice(DESCRIBE[lang]), caption(scene, lang)
    if llava:
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


# ----------------------------------------------------------------------------- the files


def heldout_name(split: str, task: str) -> str:
    """The path key and file stem of a held-out split's "questions" or "captions": the gated split keeps the plain
    `sft_test` / `caption_test`, the others add the split's name (`sft_test_seen`, `caption_test_unseen-pair`)."""
    stem = "sft_test" if task == "questions" else "caption_test"
    return stem if split == GATED else f"{stem}_{split}"


def _draw(rng: random.Random, pool: dict, kind: str, value: str, image_size: int) -> Scene:
    return render(rng, rng.choice(pool[kind, value]), image_size)


def _writer(out: Path, image_size: int):
    """save(scene, name) -> the image's path relative to `out`, after drawing it into out/images/."""

    def save(scene: Scene, name: str) -> str:
        draw(scene, image_size).save(out / "images" / f"{name}.png")
        return f"images/{name}.png"

    return save


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _pretrain(out: Path, n: int, seed: int, save, pool: dict, seen: set, image_size: int) -> Path:
    """Stage-1 captions (LLaVA json) of 1-3 shapes, English or Chinese."""
    rng, rows = random.Random(f"pretrain-{seed}"), []
    for i in range(n):
        scene, lang = _draw(rng, pool, "count", str(rng.randint(1, 3)), image_size), rng.choice(LANGS)
        seen.add(configuration(scene))
        rows.append({"id": f"pretrain_{i:06d}", "image": save(scene, f"pretrain_{i:06d}"),
                     "conversations": caption_turns(rng, scene, lang, llava=True)})  # fmt: skip
    path = out / "pretrain.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _sft_train(out: Path, n: int, seed: int, save, pool: dict, seen: set, image_size: int) -> Path:
    """Stage-2 questions (minimind-v jsonl), planned answer-first, and captions (half as many) among them."""
    rng, rows = random.Random(f"train-{seed}"), []
    for i, (kind, value, lang) in enumerate(plan(n, rng)):
        scene = _draw(rng, pool, kind, value, image_size)
        seen.add(configuration(scene))
        rows.append(sft_row(rng, scene, save(scene, f"train_{i:06d}"), kind, lang, rng.random() < MULTI_TURN))
    for i in range(n, n + round(n * SFT_CAPTIONS)):  # captions too, or stage 2 would forget how to describe
        scene, lang = _draw(rng, pool, "count", str(rng.randint(1, 3)), image_size), rng.choice(LANGS)
        seen.add(configuration(scene))
        rows.append({"conversations": caption_turns(rng, scene, lang), "image": save(scene, f"train_{i:06d}")})
    rng.shuffle(rows)
    return write_jsonl(out / "sft_train.jsonl", rows)


def _heldout(out: Path, split: str, n: int, n_captions: int, seed: int, save, pool: dict, size: int) -> dict:
    """A held-out split: n questions planned over the answers its pool can give, and n_captions captions cycling
    through its shape counts and both languages. One-turn records (minimind-v jsonl)."""
    if not pool:
        raise ValueError(f"no {split} configuration to draw from: too few training scenes show the parts it needs")
    rng, names = random.Random(f"test-{split}-{seed}"), {}
    answers = {kind: [v for v in ANSWERS[kind] if (kind, v) in pool] for kind in KINDS}
    rows = []
    for i, (kind, value, lang) in enumerate(plan(n, rng, answers)):
        scene = _draw(rng, pool, kind, value, size)
        rows.append(sft_row(rng, scene, save(scene, f"test_{split}_{i:06d}"), kind, lang, multi_turn=False))
    names["questions"] = write_jsonl(out / f"{heldout_name(split, 'questions')}.jsonl", rows)
    if n_captions:
        rows, counts = [], answers["count"]
        for i in range(n_captions):
            scene, lang = _draw(rng, pool, "count", counts[i % len(counts)], size), LANGS[i // len(counts) % 2]
            image = save(scene, f"caption_test_{split}_{i:06d}")
            rows.append({"conversations": caption_turns(rng, scene, lang), "image": image})
        names["captions"] = write_jsonl(out / f"{heldout_name(split, 'captions')}.jsonl", rows)
    return {heldout_name(split, task): path for task, path in names.items()}


def heldout_pools(parts: Partition, seen: set[Config]) -> dict[str, dict]:
    """Each held-out split's index of configurations to draw from, once training has drawn `seen`."""
    shown = {part for config in seen for part in config}  # every (cell, colour, shape) training shows
    layout = [config for config in parts.unseen_layout if set(config) <= shown]
    return {"seen": index(seen), "unseen-layout": index(layout), "unseen-pair": index(parts.unseen_pair)}


def make_shapes_dataset(out_dir: str | Path, *, n_pretrain: int, n_sft: int, n_test: int, n_caption_test: int = 0,
                        image_size: int = IMAGE_SIZE, seed: int = 0) -> dict[str, Path]:  # fmt: skip
    """Write the training files (`pretrain`, `sft_train`) and, for each of SPLITS, `n_test` questions and
    `n_caption_test` captions (half English, half Chinese); keys and names as `heldout_name` gives them."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    save, parts, seen = _writer(out, image_size), partition(seed), set()  # seen: what training drew
    train = index(parts.train)
    paths = {"pretrain": _pretrain(out, n_pretrain, seed, save, train, seen, image_size)}
    paths["sft_train"] = _sft_train(out, n_sft, seed, save, train, seen, image_size)
    for split, pool in heldout_pools(parts, seen).items():
        paths |= _heldout(out, split, n_test, n_caption_test, seed, save, pool, image_size)
    return {**paths, "images": out / "images"}


# ----------------------------------------------------------------------------- reading and scoring


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
    and no other (English or Chinese); an `evaluate_vlm.py --scorer`."""
    return caption_words(prediction) == caption_words(reference)


def chance_accuracy(test_path: str | Path) -> float:
    """Accuracy of the best blind guesser: the most common answer for each question type (kind, language); for a
    caption, the most common caption in its language, read as `caption_correct` reads it."""
    answers = defaultdict(Counter)
    for turns in conversations(test_path):
        for question, reply in zip(turns[::2], turns[1::2]):
            question = question.removeprefix("<image>\n")
            kind = QUESTION_TYPE.get(question, (question, ""))
            answers[kind][tuple(caption_words(reply)) if kind[0] == "caption" else normalize_answer(reply)] += 1
    return sum(max(c.values()) for c in answers.values()) / sum(sum(c.values()) for c in answers.values())
