"""evaluate_vlm.py and its modules: answer normalisation, caption scores, the CLI with its blind baselines, the HTML
page of examples (opened in Chromium)."""

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, shape_image

import evaluate_vlm
from qwen_siglip import evaluation, gallery, inference, metrics, synthetic


@pytest.mark.parametrize(
    "a, b", [("The Red.", "red"), ("  a square!", "square"), ("红色。", "红色"), ("Two shapes", "two shapes")]
)
def test_normalised_answers_match(a, b):
    assert metrics.normalize_answer(a) == metrics.normalize_answer(b)


def test_normalisation_keeps_different_answers_apart():
    assert metrics.normalize_answer("red square") != metrics.normalize_answer("red circle")


def test_bleu4_is_one_for_identical_and_low_for_unrelated_captions():
    assert metrics.bleu4("a red circle on the left", "a red circle on the left") == pytest.approx(1.0)
    assert metrics.bleu4("two blue squares", "a red circle on the left") == 0.0
    assert 0 < metrics.bleu4("a red circle", "a red circle on the left") < 0.6  # right words, too short
    assert metrics.bleu4("左边有一个红色圆形", "左边有一个红色圆形") == pytest.approx(1.0)  # characters for CJK


def test_cider_rewards_the_rare_words_that_match():
    references = ["a red circle on the left", "a blue square on the right", "a green triangle on the left"]
    exact = metrics.cider_d(references, references)
    generic = metrics.cider_d(["a shape on the left"] * 3, references)
    assert all(e > 5 for e in exact)  # identical captions score high (10 is a perfect match of every n)
    assert all(g < 1 for g in generic)  # words every reference shares carry no weight
    swapped = metrics.cider_d(["a blue square on the right"], ["a red circle on the left"])
    assert swapped == [0.0]  # one reference: every n-gram has idf 0, nothing to reward


def test_cli_writes_predictions_and_summary_with_blind_baselines(tiny_checkpoint, shapes_data, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_checkpoint), "--dataset", str(shapes_data["sft_test"]), "--limit", "4"]
    result = evaluate_vlm.main([*argv, "--batch_size", "3", "--max_new_tokens", "3", "--output_dir", str(out)])
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(lines) == summary["examples"] == 4 == len(result["predictions"])
    assert {"question", "reference", "prediction", "exact_match", "bleu4", "cider", "blind"} <= set(lines[0])
    assert set(lines[0]["blind"]) == set(summary["blind"]) == {"shuffled", "blank"}  # both by default
    assert lines[0]["question"] in synthetic.QUESTION_TYPE  # the question as asked, without the image placeholder
    assert summary["exact_match"] == sum(p["exact_match"] for p in lines) / 4
    for name, blind in summary["blind"].items():
        assert blind["exact_match"] == sum(p["blind"][name]["exact_match"] for p in lines) / 4
    assert summary["blind_exact_match"] == max(b["exact_match"] for b in summary["blind"].values())  # the higher
    # the random tiny model answers from the image: other images change what it says
    for name in summary["blind"]:
        assert [p["prediction"] for p in lines] != [p["blind"][name]["prediction"] for p in lines], name


def test_shuffled_blind_gives_every_example_another_examples_images():
    one = [[shape_image(c)] for c in ("red", "blue", "green", "yellow", "black", "purple", "orange")]
    two = [shape_image("white"), shape_image("gray")]
    images = [*one, [], two]  # a text-only example, and one with two images
    for seed in range(20):
        blind = evaluation.shuffled(images, seed=seed)
        assert [len(b) for b in blind] == [len(i) for i in images]  # as many images as each prompt holds
        for own, given in zip(images, blind):
            assert not any(g is o for g in given for o in own), "an example kept its own image"
        donors = [next(k for k, own in enumerate(images) if b[0] in own) for b in blind if b]
        assert sorted(donors) == [k for k, own in enumerate(images) if own]  # each example's images used once
    assert evaluation.shuffled([[shape_image()], []]) is None  # nobody to swap with


def test_shuffled_blind_asks_the_same_question_of_another_picture():
    images = [[shape_image(c)] for c in ("red", "blue", "green", "yellow", "black", "purple", "orange")]
    keys = ["colour?", "count?", "colour?", "count?", "colour?", "unique", "count?"]
    for seed in range(20):
        blind = evaluation.shuffled(images, keys, seed)
        donors = [next(k for k, own in enumerate(images) if b[0] is own[0]) for b in blind]
        assert all(d != i for i, d in enumerate(donors))
        # the same question; the lone "unique" joins a group (one there gets its image) rather than keep its own
        assert all(keys[d] in (keys[i], "unique") for i, d in enumerate(donors) if keys[i] != "unique")
        assert sum(keys[d] != keys[i] for i, d in enumerate(donors)) == 2
    lone = evaluation.shuffled(images[:3], ["a", "b", "b"])  # the one "a" joins the "b"s rather than keep its own
    assert all(b[0] is not own[0] for b, own in zip(lone, images[:3]))


def test_a_blind_of_your_own_replaces_every_image(tiny_checkpoint, shapes_data, tmp_path):
    argv = ["--model", str(tiny_checkpoint), "--dataset", str(shapes_data["sft_test"]), "--limit", "3"]
    result = evaluate_vlm.main([*argv, "--max_new_tokens", "2", "--blind", "qwen_siglip.synthetic:empty_scene",
                                "--output_dir", str(tmp_path)])  # fmt: skip
    assert set(result["summary"]["blind"]) == {"empty_scene"}
    with pytest.raises(SystemExit):
        evaluate_vlm.main([*argv, "--blind", "grey"])  # neither built in nor module:function
    name, blind = evaluation.load_blind("qwen_siglip.synthetic:empty_scene")
    swapped = evaluation.blind_images(blind, [[shape_image()], [shape_image(), shape_image()]], keys=["q", "q"])
    assert [len(s) for s in swapped] == [1, 2] and all(len(i.getcolors()) == 1 for s in swapped for i in s)


def valid_answers(question: str) -> set[str]:
    """Every answer the synthetic world has for this question's type, normalised: what a real guess looks like."""
    kind, lang = synthetic.QUESTION_TYPE[question]
    return {metrics.normalize_answer(synthetic.ZH.get(v, v) if lang == "zh" else v) for v in synthetic.ANSWERS[kind]}


def test_trained_default_beats_a_fair_blind_baseline(quickstart_run, tmp_path):
    """On unseen layouts, the trained default beats another held-out image by a wide margin, and that baseline is a
    fair one: the model answers each question with a real answer about the wrong picture (a baseline that makes the
    model write junk would be beaten trivially, and fails here)."""
    data = quickstart_run["checkpoint"].parent / "data" / "sft_test.jsonl"
    result = evaluate_vlm.main(["--model", str(quickstart_run["checkpoint"]), "--dataset", str(data), "--limit", "64",
                                "--blind", "shuffled", "--output_dir", str(tmp_path)])  # fmt: skip
    summary, predictions = result["summary"], result["predictions"]
    guesses = [metrics.normalize_answer(p["blind"]["shuffled"]["prediction"]) for p in predictions]
    real = sum(g in valid_answers(p["question"]) for g, p in zip(guesses, predictions)) / len(predictions)
    assert real >= 0.9, f"only {real:.0%} of the blind answers are answers at all"
    assert summary["exact_match"] >= 0.85 and summary["exact_match"] >= summary["blind_exact_match"] + 0.4


def test_the_page_puts_wrong_examples_first_and_escapes_what_it_shows(tmp_path):
    def prediction(question: str, right: bool) -> dict:
        blind = {"prediction": "<b>red</b>", "exact_match": False, "cider": 0.0}
        return {"question": question, "reference": "red", "prediction": "red" if right else "blue",
                "exact_match": right, "cider": 1.0, "blind": {"shuffled": blind}}  # fmt: skip

    predictions = [prediction("q1 <script>alert(1)</script>", True), prediction("q2", False), prediction("q3", True)]
    summary = {"examples": 3, "exact_match": 2 / 3, "cider": 1.0, "skipped": {}, "blind": {"shuffled": {
        "exact_match": 0.0, "cider": 0.0}}}  # fmt: skip
    images = [[shape_image("red")], [shape_image("blue")], [shape_image("green", size=400)]]
    page = gallery.write_page(tmp_path / "p.html", {"summary": summary, "predictions": predictions, "images": images},
                              "model on test.jsonl").read_text()  # fmt: skip
    assert page.index("q2") < page.index("q1") < page.index("q3")  # wrong first, then in order
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;red" in page
    assert page.count("<figure") == 3 and page.count('class="wrong"') == 1
    assert page.count("data:image/png;base64,") == 2 and page.count("data:image/jpeg;base64,") == 1  # photo: JPEG
    assert 'data-examples="3" data-right="2" data-shown="3"' in page and "66.7%" in page
    limited = gallery.write_page(tmp_path / "q.html", {"summary": summary, "predictions": predictions,
                                 "images": images}, "t", limit=1).read_text()  # fmt: skip
    assert limited.count("<figure") == 1 and "q2" in limited and 'data-shown="1"' in limited


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    from test_app import CHROMIUM, CHROMIUM_ARGS  # the app's browser tests' Chromium and its settings

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_quickstart_pages_show_every_example_with_its_image_and_the_scores_of_summary_json(quickstart_run, browser):
    """Each held-out split's page (questions and captions) opens in Chromium with every image loaded, its counts
    equal to summary.json's, wrong examples first, nothing fetched from anywhere and no path of this machine."""
    checkpoint = quickstart_run["checkpoint"]
    machine = {str(ROOT), str(checkpoint.resolve().parent), os.path.expanduser("~"), "file://"}
    requests = []  # every URL any page asks for
    for split in synthetic.SPLITS:
        for task, metric in (("questions", "exact_match"), ("captions", "caption_correct")):
            folder = checkpoint / "eval" / split / task
            summary, html = json.loads((folder / "summary.json").read_text()), (folder / "examples.html").read_text()
            assert not [m for m in machine if m in html], f"{split} {task}: the page names a path of this machine"
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto((folder / "examples.html").as_uri())
            counts = page.locator("#counts")
            examples, right = int(counts.get_attribute("data-examples")), int(counts.get_attribute("data-right"))
            assert examples == summary["examples"] and right == round(summary[metric] * examples), (split, task)
            assert page.locator("figure").count() == examples == int(counts.get_attribute("data-shown"))
            verdicts = page.locator("figure").evaluate_all("fs => fs.map(f => f.className)")
            assert verdicts == ["wrong"] * (examples - right) + ["right"] * right
            loaded = page.locator("img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
            assert len(loaded) == examples and all(loaded), f"{split} {task}: an image did not load"
            assert not [u for u in requests if not u.startswith(("file:", "data:"))], requests
            page.close()


# --- hostile input, remote code, results on the Hub -------------------------------------------------------------


def test_a_one_megabyte_question_is_skipped_and_counted_without_tokenizing_it_whole(
    tiny_checkpoint, shapes_data, tmp_path, monkeypatch
):
    rows = [json.loads(line) for line in shapes_data["sft_test"].read_text().splitlines()[:2]]
    question = "<image>\n" + "red square " * 100_000  # 1.1 MB
    huge = {**rows[0], "conversations": [{"role": "user", "content": question}, rows[0]["conversations"][1]]}
    data = tmp_path / "hostile.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [huge, rows[1]]))
    seen = []  # the length of every text the tokenizer is asked to encode
    from transformers import PreTrainedTokenizerBase

    encode = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text or []))
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    root = str(shapes_data["sft_test"].parent)
    result = evaluate_vlm.main(["--model", str(tiny_checkpoint), "--dataset", str(data), "--image_root", root,
                            "--max_new_tokens", "3", "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    assert result["summary"]["skipped"] == {"prompt_too_long": 1}
    assert result["summary"]["examples"] == 1 and len(result["predictions"]) == 1
    assert seen and max(seen) < 10 * 1024, "the megabyte was tokenized whole (over a second, and 250k tokens)"


def split_prompt(example: dict) -> list[dict]:
    return evaluation.split_example(example)[0]


def test_prompt_length_counts_expanded_image_tokens_exactly(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = processor(images=[shape_image()], text=text, return_tensors="pt")["input_ids"].shape[1]
    assert inference.prompt_length(processor, text, 1024) == expected


def test_a_hub_id_needs_trust_remote_code_and_nothing_is_downloaded_without_it(monkeypatch, capsys, tmp_path):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the remote-code check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(SystemExit):
        evaluate_vlm.main(["--model", "someone/qwen-siglip", "--dataset", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert "--trust_remote_code" in err and "--revision" in err and "runs the Python code" in err
    with pytest.raises(ValueError, match="neither a local folder nor a Hub id"):
        inference.remote_code_allowed("no/such/folder")
    assert inference.remote_code_allowed("someone/qwen-siglip", trust_remote_code=True)


def test_a_local_folder_loads_with_its_own_code_and_a_hub_id_gets_the_revision(tiny_checkpoint, monkeypatch):
    import transformers

    calls = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda m, **kw: calls.append(kw) or Fake()
    )
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda m, **kw: calls.append(kw))
    inference.load_model(str(tiny_checkpoint))
    inference.load_model("someone/qwen-siglip", trust_remote_code=True, revision="0123abc")
    assert [(c["trust_remote_code"], c["revision"]) for c in calls] == [(True, None)] * 2 + [(True, "0123abc")] * 2


class Fake:
    def eval(self):
        return self


def test_write_card_puts_scores_in_model_index_and_keeps_the_card(tiny_checkpoint, shapes_data, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    body = "# my model\n\nHand-written text that must survive.\n"
    (model / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- qwen-siglip\n---\n" + body)
    argv = ["--model", str(model), "--dataset", str(shapes_data["sft_test"]), "--limit", "2", "--max_new_tokens", "2"]
    summary = evaluate_vlm.main([*argv, "--write_card"])["summary"]
    evaluate_vlm.main([*argv, "--write_card"])  # again: replaces its results, does not add a second set
    card = ModelCard.load(model / "README.md")
    assert (
        card.text.strip() == body.strip() and card.data.license == "apache-2.0" and card.data.tags == ["qwen-siglip"]
    )
    results = {r.metric_type: r for r in card.data.eval_results}
    assert len(results) == len(card.data.eval_results) == 5
    assert results["exact_match"].metric_value == round(summary["exact_match"], 4)
    assert results["blind_exact_match"].metric_value == round(summary["blind_exact_match"], 4)
    assert {r.task_type for r in results.values()} == {"image-text-to-text"}
    assert {r.dataset_type for r in results.values()} == {"sft_test.jsonl"}  # its name, never a path
    assert str(tmp_path) not in (model / "README.md").read_text()
    assert "model-index" in (model / "README.md").read_text()


def test_scorers_add_a_metric_with_its_blind_baseline(tiny_checkpoint, shapes_data, tmp_path):
    argv = ["--model", str(tiny_checkpoint), "--dataset", str(shapes_data["sft_test"]), "--limit", "3"]
    result = evaluate_vlm.main([*argv, "--max_new_tokens", "2", "--scorer", "qwen_siglip.synthetic:caption_correct",
                            "--output_dir", str(tmp_path)])  # fmt: skip
    p = result["predictions"]
    assert all(isinstance(x["caption_correct"], bool) for x in p)
    assert all(isinstance(b["caption_correct"], bool) for x in p for b in x["blind"].values())
    summary = result["summary"]
    assert summary["caption_correct"] == sum(x["caption_correct"] for x in p) / 3
    assert summary["blind"]["blank"]["caption_correct"] == sum(x["blind"]["blank"]["caption_correct"] for x in p) / 3
    assert summary["blind_caption_correct"] == max(b["caption_correct"] for b in summary["blind"].values())
    with pytest.raises(SystemExit):
        evaluate_vlm.main([*argv, "--scorer", "synthetic"])  # not module:function


def test_push_after_evaluation_carries_the_scores_and_leaves_eval_local(
    tiny_checkpoint, shapes_data, tmp_path, monkeypatch
):
    import shutil

    import huggingface_hub

    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw) or "url")
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    argv = ["--model", str(model), "--dataset", str(shapes_data["sft_test"]), "--limit", "2", "--max_new_tokens", "2"]
    evaluate_vlm.main([*argv, "--write_card", "--push_to_hub", "you/tiny"])
    (upload,) = uploads
    assert upload["repo_id"] == "you/tiny" and Path(upload["folder_path"]) == model
    assert "model-index" in (model / "README.md").read_text()  # what the upload carries
    assert "eval/**" in upload["ignore_patterns"] and (model / "eval" / "predictions.jsonl").exists()
