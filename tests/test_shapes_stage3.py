"""Stage 3 on the embedded default (`quickstart.py --stage3 dpo|grpo`, qwen_siglip/shapes_stage3.py): the pairs and
prompts come from training configurations only and change what they claim, the hallucination metric on hand-made
captions, and the `--stage3` path end to end on a tiny run with its matched SFT baseline's budget."""

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT
from test_synthetic import scene_from_pixels

import quickstart
from qwen_siglip import shapes_stage3, stage3, synthetic, training
from qwen_siglip.shapes_stage3 import described_config, hallucinated, hallucination


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def text(turns: list[dict]) -> str:
    return turns[-1]["content"]


def test_a_caption_is_read_back_as_the_configuration_it_describes_in_both_languages():
    configs = random.Random(0).sample(synthetic.CONFIGS, 500) + synthetic.CONFIGS[:48]  # every one-shape scene
    for config in configs:
        for lang in synthetic.LANGS:
            caption = shapes_stage3.caption_of(config, lang)
            assert described_config(caption) == config, caption
            assert hallucinated(caption, caption) == []


def test_pairs_show_training_configurations_only_and_change_exactly_the_attribute_they_claim(tmp_path):
    files = shapes_stage3.write_pairs(tmp_path, 64, seed=0)
    train = set(synthetic.partition(0).train)
    pairs, sft = rows(files["pairs"]), rows(files["sft"])
    assert Counter(p["attribute"] for p in pairs) == {a: 16 for a in shapes_stage3.ATTRIBUTES}
    for pair, record in zip(pairs, sft):
        shown = scene_from_pixels(tmp_path / pair["images"][0])
        chosen, rejected = described_config(text(pair["chosen"])), described_config(text(pair["rejected"]))
        assert shown in train and chosen == shown  # the picture is a training configuration, the caption says it
        assert not synthetic.has_reserved_pair(rejected)  # no reserved pair, even in words
        gone, added = set(chosen) - set(rejected), set(rejected) - set(chosen)
        if pair["attribute"] == "object":  # one shape more, nothing else changed
            assert not gone and len(added) == 1
            continue
        ((cell, colour, shape),), ((cell2, colour2, shape2),) = gone, added  # exactly one shape changed
        changed = {"position": cell != cell2, "colour": colour != colour2, "shape": shape != shape2}
        assert [k for k, v in changed.items() if v] == [pair["attribute"]], pair
        # the matched SFT baseline: the same picture and prompt, the chosen caption as its answer
        assert record["image"] == pair["images"][0] and record["conversations"] == pair["prompt"] + pair["chosen"]


def test_grpo_prompts_ask_one_kind_about_one_shape_training_scenes(tmp_path):
    prompts = rows(shapes_stage3.write_prompts(tmp_path, 48, "shape", seed=0))
    train = set(synthetic.partition(0).train)
    english = {zh: en for en, zh in synthetic.ZH.items()}
    answers = Counter()
    for row in prompts:
        question, reply = (turn["content"] for turn in row["conversations"])
        shown = scene_from_pixels(tmp_path / row["image"])
        assert shown in train and len(shown) == 1
        assert synthetic.QUESTION_TYPE[question.removeprefix("<image>\n")][0] == "shape"
        assert english.get(reply, reply) == shown[0][2]  # the answer is the shape in the picture
        answers[reply] += 1
    assert len(answers) == 6 and max(answers.values()) - min(answers.values()) <= 1  # 3 shapes x 2 languages


@pytest.mark.parametrize(
    "prediction, reference, kinds",
    [
        ("a red circle on the top left", "a red circle on the top left", []),
        ("a red square on the top left", "a red circle on the top left", ["shape", "object"]),
        ("a blue circle on the top left", "a red circle on the top left", ["colour", "object"]),
        ("a red circle on the bottom right", "a red circle on the top left", ["position"]),
        # both colours and both shapes are in the picture, but not together: a coloured shape that is not there
        ("two shapes: a red square on the top left and a blue circle on the top right",
         "two shapes: a red circle on the top left and a blue square on the top right", ["object"]),
        # a shape more than there are, and a wrong number word
        ("two shapes: a red circle on the top left and a red circle on the top right",
         "a red circle on the top left", ["position", "count"]),
        ("three shapes: a red circle on the top left and a blue square on the top right",
         "two shapes: a red circle on the top left and a blue square on the top right", ["count"]),
        # leaving a shape out is wrong (caption_correct) but names nothing that is not there
        ("a red circle on the top left", "two shapes: a red circle on the top left and a blue square on the top right",
         []),
        ("", "a red circle on the top left", []),
        # Chinese: 左上方有一个黄色正方形 = a yellow square on the top left
        ("左上方有一个黄色正方形", "左上方有一个黄色圆形", ["shape", "object"]),
        ("两个形状：左上方有一个红色正方形，右上方有一个蓝色圆形",
         "两个形状：左上方有一个红色圆形，右上方有一个蓝色正方形", ["object"]),
        ("右下方有一个红色圆形", "左上方有一个红色圆形", ["position"]),
    ],
)  # fmt: skip
def test_hallucination_names_what_a_caption_says_that_the_picture_does_not_hold(prediction, reference, kinds):
    assert hallucinated(prediction, reference) == kinds
    assert hallucination(prediction, reference) is bool(kinds)


def test_the_weakest_kind_is_the_one_with_the_most_wrong_answers_over_the_splits():
    predictions = [{"question": "<image>\nWhat shape is it?", "exact_match": right} for right in (1, 0, 0, 1)]
    predictions += [{"question": "How many shapes are there?", "exact_match": right} for right in (1, 1, 1, 0)]
    assert shapes_stage3.kind_scores(predictions) == {"shape": 0.5, "count": 0.75}
    per_split = {"seen": {"shape": 1.0, "count": 0.9}, "unseen-pair": {"shape": 0.6, "count": 0.95}}
    assert shapes_stage3.weakest_kind(per_split) == "shape"


# ----------------------------------------------------------------------------- the --stage3 path, end to end


def in_process(title: str, script: str, recipe: str, log: Path, *args: str) -> None:
    """quickstart.stage's run, in this process (the scripts' own main; saves each a process start)."""
    argv = ["--config", str(ROOT / "recipes" / recipe), "--disable_tqdm", "true", *args]
    name = script.removeprefix("train_").removesuffix(".py")
    (stage3.main if name in ("dpo", "grpo") else training.main)(name, argv)


@pytest.fixture
def finished_stage2(tiny_checkpoint, tmp_path) -> Path:
    """A quickstart folder as a finished stage 2 leaves it, small: data/, sft/ (the tiny model) and sft/eval/."""
    data = synthetic.make_shapes_dataset(tmp_path / "data", n_pretrain=4, n_sft=4, n_test=8, n_caption_test=4)
    shutil.copytree(tiny_checkpoint, tmp_path / "sft")
    shapes_stage3.score_heldout(tmp_path / "sft", data, {"questions": 4, "captions": 8}, tmp_path / "sft" / "eval")
    return tmp_path


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_stage3_runs_end_to_end_and_its_sft_baseline_has_the_same_steps_and_examples(method, finished_stage2,
                                                                                     monkeypatch):  # fmt: skip
    monkeypatch.setattr(quickstart, "stage", in_process)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # quickstart sets it; put back after
    out = finished_stage2
    summary = quickstart.main(["--out", str(out), "--stage3", method, "--stage3-steps", "2", "--threads", "1"])
    recipe = quickstart.yaml.safe_load((ROOT / "recipes" / f"quickstart_{method}.yaml").read_text())
    per_step = recipe["global_batch_size"] // recipe.get("num_generations", 1)
    # read back from what each run wrote (its model card's settings), not from what quickstart asked for
    assert shapes_stage3.budget(out / method) == shapes_stage3.budget(out / f"{method}-sft")
    assert shapes_stage3.budget(out / method) == {"steps": 2, "examples": 2 * per_step}
    # from the same checkpoint, at the same learning rate and schedule, training the same modules
    stage3_card, sft_card = (
        shapes_stage3.card_settings(out / method),
        shapes_stage3.card_settings(out / f"{method}-sft"),
    )
    for setting in ("started from", "learning rate", "schedule", "modules trained"):
        assert stage3_card[setting] == sft_card[setting], setting
    table = (out / f"stage3-{method}.md").read_text()
    models = ("stage 2", f"+ {method.upper()}", "+ SFT, same budget")
    for split in synthetic.SPLITS:
        for model in models:
            assert f"| {split} | {model} | " in table
    assert set(summary["models"]) == set(models)
    if method == "grpo":  # it trained on the kind stage 2 got most wrong
        assert summary["kind"] in synthetic.KINDS and f" {summary['kind']}* |" in table
