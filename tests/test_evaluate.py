"""evaluate.py: answer normalisation, caption scores, and the CLI with its blind baseline."""

import json

import pytest

import evaluate


@pytest.mark.parametrize(
    "a, b", [("The Red.", "red"), ("  a square!", "square"), ("红色。", "红色"), ("Two shapes", "two shapes")]
)
def test_normalised_answers_match(a, b):
    assert evaluate.normalize_answer(a) == evaluate.normalize_answer(b)


def test_normalisation_keeps_different_answers_apart():
    assert evaluate.normalize_answer("red square") != evaluate.normalize_answer("red circle")


def test_bleu4_is_one_for_identical_and_low_for_unrelated_captions():
    assert evaluate.bleu4("a red circle on the left", "a red circle on the left") == pytest.approx(1.0)
    assert evaluate.bleu4("two blue squares", "a red circle on the left") == 0.0
    assert 0 < evaluate.bleu4("a red circle", "a red circle on the left") < 0.6  # right words, too short
    assert evaluate.bleu4("左边有一个红色圆形", "左边有一个红色圆形") == pytest.approx(1.0)  # characters for CJK


def test_cider_rewards_the_rare_words_that_match():
    references = ["a red circle on the left", "a blue square on the right", "a green triangle on the left"]
    exact = evaluate.cider_d(references, references)
    generic = evaluate.cider_d(["a shape on the left"] * 3, references)
    assert all(e > 5 for e in exact)  # identical captions score high (10 is a perfect match of every n)
    assert all(g < 1 for g in generic)  # words every reference shares carry no weight
    swapped = evaluate.cider_d(["a blue square on the right"], ["a red circle on the left"])
    assert swapped == [0.0]  # one reference: every n-gram has idf 0, nothing to reward


def test_cli_writes_predictions_and_summary_with_blind_baseline(tiny_checkpoint, shapes_data, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_checkpoint), "--dataset", str(shapes_data["sft_test"]), "--limit", "4"]
    result = evaluate.main([*argv, "--batch_size", "3", "--max_new_tokens", "3", "--output_dir", str(out)])
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(lines) == summary["examples"] == 4 == len(result["predictions"])
    assert {"reference", "prediction", "blind_prediction", "exact_match", "bleu4", "cider"} <= set(lines[0])
    assert summary["exact_match"] == sum(p["exact_match"] for p in lines) / 4
    # the random tiny model answers from the image: grey images change what it says
    assert [p["prediction"] for p in lines] != [p["blind_prediction"] for p in lines]


def test_trained_default_beats_its_blind_baseline(quickstart_run, tmp_path):
    data = quickstart_run["checkpoint"].parent / "data" / "sft_test.jsonl"
    result = evaluate.main(["--model", str(quickstart_run["checkpoint"]), "--dataset", str(data), "--limit", "48",
                            "--output_dir", str(tmp_path)])  # fmt: skip
    summary = result["summary"]
    assert summary["exact_match"] >= 0.85 and summary["exact_match"] >= summary["blind_exact_match"] + 0.5
