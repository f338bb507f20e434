import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from qwen_siglip import synthetic

SIZES = {"n_pretrain": 60, "n_sft": 240, "n_test": 192}
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


def describe_pixels(path: Path) -> tuple[int, str, str, str]:
    """(count, colour, shape, side) of a PNG, from pixels alone; attributes are of the first shape found."""
    img = Image.open(path).convert("RGB")
    size = img.width
    # Shapes are saturated, the background is light grey-ish: a large channel spread marks a shape pixel.
    pixels = img.load()
    quadrants = defaultdict(list)  # at most one shape per quadrant
    for y in range(size):
        for x in range(size):
            if max(pixels[x, y]) - min(pixels[x, y]) > 100:
                quadrants[x * 2 // size, y * 2 // size].append((x, y, pixels[x, y]))
    count, mine = len(quadrants), next(iter(quadrants.values()))
    rgb = Counter(p for _, _, p in mine).most_common(1)[0][0]
    colour = min(REFERENCE_RGB, key=lambda c: sum((a - b) ** 2 for a, b in zip(REFERENCE_RGB[c], rgb)))
    xs, ys = [px for px, _, _ in mine], [py for _, py, _ in mine]
    fill = len(mine) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))  # square 1, circle ~0.8, triangle ~0.5
    shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
    side = "left" if (min(xs) + max(xs)) / 2 < size / 2 else "right"
    return count, colour, shape, side


def test_generation_is_deterministic(tmp_path):
    a = synthetic.make_shapes_dataset(tmp_path / "a", **SIZES, seed=3)
    b = synthetic.make_shapes_dataset(tmp_path / "b", **SIZES, seed=3)
    c = synthetic.make_shapes_dataset(tmp_path / "c", **SIZES, seed=4)
    for name in ("pretrain", "sft_train", "sft_test"):
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()
    images = sorted(p.name for p in a["images"].iterdir())
    assert len(images) == sum(SIZES.values()) + round(SIZES["n_sft"] * synthetic.SFT_CAPTIONS)
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

    for name in ("sft_train", "sft_test"):
        rows = read_jsonl(data[name])
        captions = [r for r in rows if r["conversations"][0]["content"].removeprefix("<image>\n") in DESCRIBE]
        n_questions = SIZES["n_sft" if name == "sft_train" else "n_test"]
        assert len(captions) == (round(n_questions * synthetic.SFT_CAPTIONS) if name == "sft_train" else 0)
        assert len(rows) == n_questions + len(captions)
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


def test_test_images_are_not_in_train(data):
    train = [r["image"] for r in json.loads(data["pretrain"].read_text())]
    train += [r["image"] for r in read_jsonl(data["sft_train"])]
    test = [r["image"] for r in read_jsonl(data["sft_test"])]
    assert not set(train) & set(test)

    def pixels(rel: str) -> bytes:
        return Image.open(data["images"].parent / rel).convert("RGB").tobytes()

    assert not {pixels(p) for p in train} & {pixels(p) for p in test}


def test_answers_match_the_drawn_image(data):
    checked = Counter()
    for name in ("sft_train", "sft_test"):
        for image, question, reply in qa_pairs(read_jsonl(data[name])):
            count, colour, shape, side = describe_pixels(data["images"].parent / image)
            kind, _ = synthetic.QUESTION_TYPE[question.removeprefix("<image>\n")]
            if kind != "count":
                assert count == 1, (image, question)  # "the shape" always refers to a single shape
            drawn = {"count": str(count), "colour": colour, "shape": shape, "position": side}[kind]
            assert EN.get(reply, reply) == drawn, (image, question, reply)
            checked[kind] += 1
    assert min(checked.values()) > 50, checked


def test_blind_baseline_is_near_chance(data):
    # colour 1/4, shape 1/3, position 1/2, count 1/3 -> ~0.35 when answers are balanced
    chance = synthetic.chance_accuracy(data["sft_test"])
    assert 0.25 < chance < 0.45
    pairs = qa_pairs(read_jsonl(data["sft_test"]))
    answers = Counter(a for _, q, a in pairs if synthetic.QUESTION_TYPE[q.removeprefix("<image>\n")][0] == "colour")
    assert set(answers) == {"red", "green", "blue", "yellow", "红色", "绿色", "蓝色", "黄色"}
    assert max(answers.values()) - min(answers.values()) <= 1  # balanced, not just present


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


def test_held_out_captions_are_unseen_and_cover_both_languages_and_every_count(tmp_path):
    data = synthetic.make_shapes_dataset(tmp_path, **SIZES, n_caption_test=12, seed=0)
    rows = read_jsonl(data["caption_test"])
    captions = [row["conversations"][1]["content"] for row in rows]
    assert len(rows) == 12 and sum(bool(CJK.search(c)) for c in captions) == 6
    assert {len(synthetic.caption_words(c)) for c in captions} >= {3, 7, 10}  # 1, 2 and 3 shapes
    train = {Image.open(tmp_path / row["image"]).tobytes() for row in read_jsonl(data["sft_train"])}
    assert not any(Image.open(tmp_path / row["image"]).tobytes() in train for row in rows)
