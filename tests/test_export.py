"""Export to transformers' LLaVA: the exported folder is the same model, served by code that knows nothing of ours."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, build_tiny, shape_image
from safetensors.torch import load_file

from configuration_qwen_siglip import QwenSiglipConfig
from export_llava import export, llava_config, main, to_llava

# Runs in `python -I` from a folder outside the repo: only transformers' own LLaVA can load the export here.
FRESH_PROCESS_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
try:
    import modeling_qwen_siglip
    sys.exit("the repo is importable: this process is not fresh")
except ImportError:
    pass
folder, out_path = sys.argv[1:]
processor = AutoProcessor.from_pretrained(folder)  # no trust_remote_code, on purpose
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
messages = json.load(open("messages.json"))
x = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
with torch.no_grad():
    logits = model(**x).logits
    generated = model.generate(**x, max_new_tokens=12, do_sample=False)
classes = [type(processor).__name__, type(model).__name__]
torch.save({"classes": classes, "inputs": dict(x), "logits": logits, "generated": generated}, out_path)
"""


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported through the command line entry point."""
    dst = tmp_path_factory.mktemp("export") / "llava"
    main(["--model", str(tiny_checkpoint), "--output", str(dst)])
    return dst


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(folder, messages): a turn with two images saved as files, so both processes read the same pixels."""
    folder = tmp_path_factory.mktemp("chat")
    shape_image("red").save(folder / "red.png")
    shape_image("blue", box=(2, 20, 40, 44)).save(folder / "blue.png")
    content = [
        {"type": "image", "image": str(folder / "red.png")},
        {"type": "text", "text": "Compare"},
        {"type": "image", "image": str(folder / "blue.png")},
        {"type": "text", "text": "What colour is the shape?"},
    ]
    messages = [{"role": "user", "content": content}]
    (folder / "messages.json").write_text(json.dumps(messages))
    return folder, messages


@pytest.fixture(scope="module")
def fresh(exported, chat):
    """What the export computes in a fresh process with no access to the repo."""
    folder, _ = chat
    (folder / "script.py").write_text(FRESH_PROCESS_SCRIPT)
    # -I: isolated mode, so neither the repo nor PYTHONPATH is on sys.path; cwd is elsewhere too.
    cmd = [sys.executable, "-I", "script.py", str(exported), "out.pt"]
    run = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(folder / "out.pt")


@pytest.fixture(scope="module")
def original(tiny, chat):
    """The same chat through our own processor and model."""
    model, processor = tiny
    _, messages = chat
    x = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**x).logits
        generated = model.generate(**x, max_new_tokens=12, do_sample=False)
    return {"inputs": dict(x), "logits": logits, "generated": generated}


def test_exported_llava_loads_without_remote_code_and_gives_same_logits(fresh, original):
    assert fresh["classes"] == ["LlavaProcessor", "LlavaForConditionalGeneration"]
    torch.testing.assert_close(fresh["logits"], original["logits"])


def test_exported_llava_greedy_generation_matches(fresh, original):
    new = original["generated"][0, original["inputs"]["input_ids"].shape[1] :]
    assert len(set(new.tolist())) > 1  # a varied continuation, so agreement is not a coincidence
    assert torch.equal(fresh["generated"], original["generated"])


def test_exported_processor_gives_same_input_ids_and_pixel_values(fresh, original, tiny):
    _, processor = tiny
    ours, theirs = original["inputs"], fresh["inputs"]
    assert set(theirs) == set(ours) == {"input_ids", "attention_mask", "pixel_values"}
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key
    assert int((ours["input_ids"] == processor.image_token_id).sum()) == 2 * processor.num_image_tokens
    assert ours["pixel_values"].shape[0] == 2


def test_exported_folder_is_plain_llava_in_the_llava_hf_layout(exported, tiny):
    model, _ = tiny
    assert not list(exported.glob("*.py"))
    for path in exported.glob("*.json"):
        assert "auto_map" not in path.read_text() and "QwenSiglip" not in path.read_text(), path.name
    config = json.loads((exported / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llava", ["LlavaForConditionalGeneration"])
    assert (config["vision_feature_select_strategy"], config["vision_feature_layer"]) == ("full", -1)
    assert config["image_token_index"] == model.config.image_token_id
    assert config["image_seq_length"] == model.config.num_image_tokens
    assert config["text_config"]["architectures"] == ["Qwen2ForCausalLM"]  # how vLLM picks the LM
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == model.generation_config.eos_token_id  # end-of-turn and padding stop it
    assert generation["pad_token_id"] == model.generation_config.pad_token_id
    # vLLM and older transformers read LLaVA weights under these names (SigLIP keeps its `vision_model.` level).
    weights = load_file(exported / "model.safetensors")
    prefixes = ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.")
    assert all(k.startswith(prefixes) for k in weights), [k for k in weights if not k.startswith(prefixes)]
    # every tensor, the tied lm_head once, plus the identity post-layernorm LLaVA builds and never reads
    assert len(weights) == len(model.state_dict()) - 1 + 2


def test_llava_config_of_the_published_architecture():
    config = llava_config(QwenSiglipConfig.from_pretrained(ROOT))
    assert (config.image_token_id, config.image_seq_length) == (151655, 196)
    assert config.vision_feature_select_strategy == "full"  # SigLIP has no CLS token to drop
    assert (config.vision_feature_layer, config.projector_hidden_act, config.tie_word_embeddings) == (-1, "gelu", True)
    assert (config.vision_config.model_type, config.vision_config.vision_use_head) == ("siglip_vision_model", False)
    # The root config.json names no LM class; vLLM needs one to build the language model.
    assert config.text_config.architectures == ["Qwen2ForCausalLM"]


def test_to_llava_in_memory_gives_same_logits_and_shares_weights(tiny):
    model, processor = tiny
    texts = ["<image>What colour?", "<image><image>Compare them, please."]
    images = [[shape_image("green")], [shape_image("red"), shape_image("blue", box=(0, 0, 20, 47))]]
    x = processor(images=images, text=texts, padding=True, return_tensors="pt")
    llava = to_llava(model)
    with torch.no_grad():
        torch.testing.assert_close(llava(**x).logits, model(**x).logits)
    assert type(llava).__name__ == "LlavaForConditionalGeneration" and not llava.training
    assert llava.model.vision_tower.embeddings.patch_embedding.weight.data_ptr() == (
        model.model.vision_tower.embeddings.patch_embedding.weight.data_ptr()
    )
    assert llava.lm_head.weight is llava.model.language_model.embed_tokens.weight


def test_pixel_shuffle_checkpoint_is_refused_with_reason(tiny_bases, tmp_path):
    model, processor = build_tiny(tiny_bases, spread=False, pixel_shuffle_factor=2)
    src, dst = tmp_path / "shuffled", tmp_path / "llava"
    model.save_pretrained(src)
    processor.save_pretrained(src)
    reason = r"pixel_shuffle_factor=2.*one vision token per image token and has no pixel-shuffle step"
    with pytest.raises(ValueError, match=reason):
        export(str(src), str(dst))
    assert not dst.exists()  # refused before anything was written
    with pytest.raises(ValueError, match=reason):
        to_llava(model)


def test_export_refuses_a_folder_that_is_not_empty(tiny_checkpoint, tmp_path):
    (tmp_path / "modeling_qwen_siglip.py").write_text("# left from an earlier run\n")
    with pytest.raises(FileExistsError, match="not empty"):
        export(str(tiny_checkpoint), str(tmp_path))


def test_vision_feature_layer_list_exports_with_the_same_logits(tiny_bases):
    # LLaVA concatenates the listed layers' features exactly as we do: a list is expressible, so it is not refused.
    model, processor = build_tiny(tiny_bases, vision_feature_layer=[0, -1])
    x = processor(images=[shape_image("green")], text="<image>What colour?", return_tensors="pt")
    llava = to_llava(model)
    assert llava.config.vision_feature_layer == [0, -1]
    with torch.no_grad():
        torch.testing.assert_close(llava(**x).logits, model(**x).logits)
