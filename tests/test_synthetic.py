"""The synthetic shapes world: files in the documented formats, labels that match the pixels, held-out splits that
are what they claim (checked from the pixels, never from the generator's own bookkeeping), balanced answers."""

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from qwen_siglip import synthetic

SIZES = {"n_pretrain": 60, "n_sft": 240, "n_test": 192, "n_caption_test": 24}
HELD_OUT = [synthetic.heldout_name(split, task) for split in synthetic.SPLITS for task in ("questions", "captions")]
CJK = re.compile(r"[\u4e00-\u9fff]")
# The expected answers in both languages, written out here rather than imported, to check the generator.
EN = {"红色": "red", "绿色": "green", "蓝色": "blue", "黄色": "yellow", "圆形": "circle", "正方形": "square"}
EN |= {"三角形": "triangle", "左边": "left", "右边": "right"}
REFERENCE_RGB = {"red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 60, 220), "yellow": (235, 190, 0)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return synthetic.make_shapes_dataset(tmp_path_factory.mktemp("shapes"), **SIZES, seed=0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


DESCRIBE = {prompt for prompts in synthetic.DESCRIBE.values() for prompt in prompts}  # caption requests


def qa_pairs(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(image, question, answer) for every question turn of minimind-v rows (captions left out)."""
    pairs = []
    for row in rows:
        turns = row["conversations"]
        pairs += [(row["image"], q["content"], a["content"]) for q, a in zip(turns[::2], turns[1::2])]
    return [(image, q, a) for image, q, a in pairs if q.removeprefix("<image>\n") not in DESCRIBE]


def scene_from_pixels(path: Path) -> tuple[tuple[int, str, str], ...]:
    """(cell, colour, shape) of every shape in a PNG, in cell order, from the pixels alone."""
    img = Image.open(path).convert("RGB")
    size, pixels = img.width, img.load()
    quadrants = defaultdict(list)  # at most one shape per quadrant
    for y in range(size):
        for x in range(size):
            # Shapes are saturated, the background is light grey-ish: a large channel spread marks a shape pixel.
            if max(pixels[x, y]) - min(pixels[x, y]) > 100:
                quadrants[(y * 2 // size) * 2 + x * 2 // size].append((x, y, pixels[x, y]))
    scene = []
    for cell, found in sorted(quadrants.items()):
        rgb = Counter(p for _, _, p in found).most_common(1)[0][0]
        colour = min(REFERENCE_RGB, key=lambda c: sum((a - b) ** 2 for a, b in zip(REFERENCE_RGB[c], rgb)))
        xs, ys = [px for px, _, _ in found], [py for _, py, _ in found]
        fill = len(found) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))  # square 1, circle ~0.8, triangle ~0.5
        scene.append((cell, colour, "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"))
    return tuple(scene)


def describe_pixels(path: Path) -> tuple[int, str, str, str]:
    """(count, colour, shape, side) of a PNG, from pixels alone; attributes are of the first shape found."""
    scene = scene_from_pixels(path)
    cell, colour, shape = scene[0]
    return len(scene), colour, shape, "left" if cell % 2 == 0 else "right"


def scenes(data: dict[str, Path], name: str) -> set[tuple]:
    """The configuration of every image a data file names, read from the pixels."""
    path = data[name]
    rows = json.loads(path.read_text()) if path.suffix == ".json" else read_jsonl(path)
    return {scene_from_pixels(path.parent / row["image"]) for row in rows}


def test_generation_is_deterministic(tmp_path):
    a = synthetic.make_shapes_dataset(tmp_path / "a", **SIZES, seed=3)
    b = synthetic.make_shapes_dataset(tmp_path / "b", **SIZES, seed=3)
    c = synthetic.make_shapes_dataset(tmp_path / "c", **SIZES, seed=4)
    for name in ("pretrain", "sft_train", *HELD_OUT):
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()
    images = sorted(p.name for p in a["images"].iterdir())
    held_out = len(synthetic.SPLITS) * (SIZES["n_test"] + SIZES["n_caption_test"])
    assert len(images) == SIZES["n_pretrain"] + SIZES["n_sft"] * (1 + synthetic.SFT_CAPTIONS) + held_out
    assert all((a["images"] / n).read_bytes() == (b["images"] / n).read_bytes() for n in images)


def test_files_are_in_the_documented_formats(data):
    pretrain = json.loads(data["pretrain"].read_text(encoding="utf-8"))
    assert len(pretrain) == SIZES["n_pretrain"]
    for row in pretrain:
        assert set(row) == {"id", "image", "conversations"} and (data["images"].parent / row["image"]).is_file()
        human, gpt = row["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and len(gpt["value"]) > 5
    assert len({row["conversations"][0]["value"] for row in pretrain}) > 3  # varied describe prompts

    for name in ("sft_train", *HELD_OUT):
        rows = read_jsonl(data[name])
        captions = [r for r in rows if r["conversations"][0]["content"].removeprefix("<image>\n") in DESCRIBE]
        if "caption" in name:  # held-out captions: captions only
            assert len(captions) == len(rows) == SIZES["n_caption_test"], name
        else:
            n_captions = round(SIZES["n_sft"] * synthetic.SFT_CAPTIONS) if name == "sft_train" else 0
            assert (
                len(captions) == n_captions
                and len(rows) == SIZES["n_sft" if name == "sft_train" else "n_test"] + n_captions
            )
        for row in rows:
            assert set(row) == {"conversations", "image"} and row["image"].startswith("images/")
            roles = [turn["role"] for turn in row["conversations"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
            assert row["conversations"][0]["content"].startswith("<image>\n")
            assert all("<image>" not in turn["content"] for turn in row["conversations"][1:])
        lengths = Counter(len(row["conversations"]) for row in rows)
        assert lengths[4] > 0 if name == "sft_train" else set(lengths) == {2}  # multi-turn only in train

    texts = synthetic.corpus_texts(data.values())
    assert "<image>\nWhat colour is the shape?" in texts and "红色" in texts and "right" in texts


def test_held_out_splits_are_what_they_claim_against_every_training_stage(data):
    """From the pixels: `seen` configurations all occur in training (stage 1 or 2); `unseen-layout` ones never do,
    though each of their (cell, colour, shape) parts does, and they include two- and three-shape scenes;
    `unseen-pair` scenes each hold a reserved (colour, shape) pair, which no training image holds."""
    train = scenes(data, "pretrain") | scenes(data, "sft_train")
    parts, pairs = {p for scene in train for p in scene}, {(c, s) for scene in train for _, c, s in scene}
    reserved = set(synthetic.RESERVED_PAIRS)
    assert reserved and not reserved & pairs, "a reserved pair is drawn in training"
    for name in HELD_OUT:
        held_out = scenes(data, name)
        if name.endswith("_seen"):
            assert held_out <= train, f"{name}: {len(held_out - train)} configurations never occur in training"
            continue
        assert not held_out & train, f"{name}: {len(held_out & train)} configurations also occur in training"
        if name.endswith("unseen-pair"):
            assert all({(c, s) for _, c, s in scene} & reserved for scene in held_out), name
        else:  # unseen-layout: new arrangements of known parts
            assert all(set(scene) <= parts for scene in held_out), f"{name}: a part training never shows"
            assert {len(scene) for scene in held_out} == {1, 2, 3}, name


def test_the_partition_reserves_layouts_and_pairs_and_leaves_training_every_part():
    world = synthetic.partition(seed=0)
    train, layout, pair = set(world.train), set(world.unseen_layout), set(world.unseen_pair)
    assert len(train | layout | pair) == len(synthetic.CONFIGS) == 48 + 864 + 6912
    assert not train & layout and not train & pair and not layout & pair
    # every part and every non-reserved pair stays in training; one-shape layouts cover both sides of each colour
    assert {p for c in layout for p in c} <= {p for c in train for p in c}
    alone = [c[0] for c in layout if len(c) == 1]
    assert {(colour, cell % 2) for cell, colour, _ in alone} == {
        (colour, s) for colour in synthetic.COLOURS for s in (0, 1)
    }
    assert synthetic.partition(seed=0) == world and synthetic.partition(seed=1) != world


def test_answers_match_the_drawn_image(data):
    checked = Counter()
    for name in ("sft_train", *(n for n in HELD_OUT if n.startswith("sft_test"))):
        for image, question, reply in qa_pairs(read_jsonl(data[name])):
            count, colour, shape, side = describe_pixels(data["images"].parent / image)
            kind, _ = synthetic.QUESTION_TYPE[question.removeprefix("<image>\n")]
            if kind != "count":
                assert count == 1, (image, question)  # "the shape" always refers to a single shape
            drawn = {"count": str(count), "colour": colour, "shape": shape, "position": side}[kind]
            assert EN.get(reply, reply) == drawn, (image, question, reply)
            checked[kind] += 1
    assert min(checked.values()) > 50, checked


def test_chance_is_the_majority_answer_of_each_question_type(tmp_path):
    def row(question: str, reply: str) -> dict:
        return {"conversations": [{"role": "user", "content": "<image>\n" + question},
                                  {"role": "assistant", "content": reply}], "image": "x.png"}  # fmt: skip

    rows = [row("What colour is the shape?", "red"), row("What color is the shape?", "Red."), row(
        "Which colour is the object?", "blue"), row("这个形状是什么颜色？", "蓝色"), row("有多少个形状？", "3"),
        row("Describe the image.", "a red circle on the top left"),
        row("Give a short caption.", "A red circle on the top left."), row("描述这张图片。", "左上方有一个红色圆形"),
    ]  # fmt: skip
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    # (colour, en): red 2 of 3; (colour, zh) 1; (count, zh) 1; (caption, en): the same caption twice; (caption, zh) 1
    assert synthetic.chance_accuracy(path) == pytest.approx((2 + 1 + 1 + 2 + 1) / 8)


def test_held_out_answers_are_balanced_so_the_question_alone_gives_chance(data):
    for name in (n for n in HELD_OUT if n.startswith("sft_test")):
        pairs = qa_pairs(read_jsonl(data[name]))
        by_type = defaultdict(Counter)
        for _, question, reply in pairs:
            by_type[synthetic.QUESTION_TYPE[question.removeprefix("<image>\n")]][reply] += 1
        for key, answers in by_type.items():
            assert max(answers.values()) - min(answers.values()) <= 2, (name, key, answers)  # balanced, not present
        assert 0.3 < synthetic.chance_accuracy(data[name]) < 0.5, name
    colours = {a for _, q, a in qa_pairs(read_jsonl(data["sft_test"])) if "colour" in q or "颜色" in q}
    assert colours == {"red", "green", "blue", "yellow", "红色", "绿色", "蓝色", "黄色"}


def test_questions_in_english_and_chinese(data):
    pairs = qa_pairs(read_jsonl(data["sft_test"]))
    chinese = [(q, a) for _, q, a in pairs if CJK.search(q)]
    english = [(q, a) for _, q, a in pairs if not CJK.search(q)]
    assert 0.4 < len(chinese) / len(pairs) < 0.6
    assert "这个形状是什么颜色？" in {q.removeprefix("<image>\n") for q, _ in chinese}
    assert {a for _, a in chinese} == set(EN) | {"1", "2", "3"}
    assert {a for _, a in english} == set(EN.values()) | {"1", "2", "3"}


def test_normalize_answer_ignores_case_space_and_final_punctuation():
    assert synthetic.normalize_answer("  Red.\n") == "red"
    assert synthetic.normalize_answer("红色。") == "红色"
    assert synthetic.normalize_answer("3!") == "3"


def test_caption_correct_needs_every_colour_shape_position_and_count_word():
    reference = "two shapes: a red circle on the top left and a blue square on the bottom right"
    assert synthetic.caption_correct("Two shapes: a red circle on the top left and a blue square on the bottom right.",
                                     reference)  # fmt: skip
    for wrong in ("two shapes: a red circle on the top left and a blue square on the bottom left",  # position
                  "two shapes: a red circle on the top left and a green square on the bottom right",  # colour
                  "two shapes: a red circle on the top left and a blue triangle on the bottom right",  # shape
                  "three shapes: a red circle on the top left and a blue square on the bottom right",  # count
                  "a red circle on the top left"):  # fmt: skip
        assert not synthetic.caption_correct(wrong, reference), wrong
    zh = "两个形状：左上方有一个红色三角形，右下方有一个蓝色圆形"  # 三角形 is a shape, not the number three
    assert synthetic.caption_correct(zh, zh)
    assert not synthetic.caption_correct(zh.replace("两", "三", 1), zh)
    assert not synthetic.caption_correct(zh.replace("三角形", "正方形"), zh)


def test_held_out_captions_cover_both_languages_and_every_count(data):
    for split in synthetic.SPLITS:
        rows = read_jsonl(data[synthetic.heldout_name(split, "captions")])
        captions = [row["conversations"][1]["content"] for row in rows]
        assert len(rows) == SIZES["n_caption_test"] and sum(bool(CJK.search(c)) for c in captions) == len(rows) / 2
        assert {len(synthetic.caption_words(c)) for c in captions} == {3, 7, 10}  # 1, 2 and 3 shapes


def test_unseen_pair_questions_ask_about_the_reserved_pairs(data):
    pairs = qa_pairs(read_jsonl(data[synthetic.heldout_name("unseen-pair", "questions")]))
    answers = defaultdict(set)
    for _, question, reply in pairs:
        answers[synthetic.QUESTION_TYPE[question.removeprefix("<image>\n")][0]].add(EN.get(reply, reply))
    assert answers["colour"] == {c for c, _ in synthetic.RESERVED_PAIRS}
    assert answers["shape"] == {s for _, s in synthetic.RESERVED_PAIRS}
    assert answers["position"] == {"left", "right"} and answers["count"] == {"1", "2", "3"}


def test_empty_scene_is_a_training_background_with_no_shape():
    image = Image.new("RGB", (32, 32), "red")
    blinds = [synthetic.empty_scene(image, i) for i in range(20)]
    assert all(b.size == image.size and len(b.getcolors()) == 1 for b in blinds)  # one colour: no shape
    tints = {b.getpixel((0, 0)) for b in blinds}
    assert len(tints) > 10 and all(230 <= v <= 255 for tint in tints for v in tint)  # as training tints them
    assert synthetic.empty_scene(image, 3).tobytes() == blinds[3].tobytes()  # deterministic
