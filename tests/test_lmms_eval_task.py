"""The lmms-eval local task (eval/lmms_eval_tasks): its hooks read our data formats as evaluate_vlm.py does.

lmms-eval itself is not installed here (it lives in its own environment, see the README); these tests call the hooks
the way it does, on the synthetic shapes set.
"""

import importlib.util
import json

import pytest
import yaml
from conftest import ROOT

from qwen_siglip.metrics import normalize_answer

TASK_DIR = ROOT / "eval" / "lmms_eval_tasks"


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("qwen_siglip_lmms_eval_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("split", ["sft_test", "pretrain"])  # role/content (minimind-v) and LLaVA from/value
def test_task_hooks_give_question_image_and_last_answer(hooks, shapes_data, split):
    kwargs = {"image_root": str(shapes_data[split].parent)}
    for doc in records(shapes_data[split]):
        turns = doc["conversations"]
        question = turns[-2].get("content", turns[-2].get("value"))
        answer = turns[-1].get("content", turns[-1].get("value"))
        assert hooks.doc_to_text(doc, kwargs) == question.replace("<image>\n", "")  # lmms-eval places the image
        assert hooks.doc_to_target(doc) == answer
        (image,) = hooks.doc_to_visual(doc, kwargs)
        assert image.mode == "RGB" and image.size == (32, 32)


def test_task_scores_normalised_exact_match_as_evaluate(hooks, shapes_data):
    doc = records(shapes_data["sft_test"])[0]
    reference = hooks.doc_to_target(doc)
    for prediction in [f"The {reference.upper()}.", f" {reference}！", "something else"]:
        expected = float(normalize_answer(prediction) == normalize_answer(reference))
        assert hooks.process_results(doc, [prediction]) == {"exact_match": expected}
    assert hooks.process_results(doc, [f"The {reference.upper()}."])["exact_match"] == 1.0


def test_task_yaml_names_existing_hooks_and_metric(hooks):
    # lmms-eval's YAML loader resolves `!function utils.x`; here the tag only has to name a hook that exists.
    class Loader(yaml.SafeLoader):  # a subclass, so the tag is not registered for everyone
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load((TASK_DIR / "qwen_siglip_local.yaml").read_text(), Loader=Loader)
    for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        module, name = config[key].split(".")
        assert module == "utils" and callable(getattr(hooks, name)), key
    assert [m["metric"] for m in config["metric_list"]] == ["exact_match"]
    assert config["dataset_kwargs"]["data_files"].startswith(
        config["lmms_eval_specific_kwargs"]["default"]["image_root"]
    )


def test_task_refuses_a_record_without_an_answer(hooks):
    doc = {"conversations": [{"role": "user", "content": "<image>\nWhat?"}], "image": "a.png"}
    with pytest.raises(ValueError, match="no user turn followed by an assistant turn"):
        hooks.doc_to_target(doc)
