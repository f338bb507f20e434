"""Export to transformers' LLaVA: the exported folder is the same model, served by code that knows nothing of ours."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, build_tiny, shape_image
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

from configuration_qwen_siglip import QwenSiglipConfig
from export_llava import main
from qwen_siglip.llava import add_image_token, export, llava_config, llava_processor, to_llava

# Runs in `python -I` from a folder outside the repo: only transformers' own LLaVA can load the export here. Each case
# is a chat (through the chat template) or raw text with image files (as LLaVA-style tools write it).
FRESH_PROCESS_SCRIPT = """
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
try:
    import modeling_qwen_siglip
    sys.exit("the repo is importable: this process is not fresh")
except ImportError:
    pass
folder, out_path = sys.argv[1:]
processor = AutoProcessor.from_pretrained(folder)  # no trust_remote_code, on purpose
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
out = {"classes": [type(processor).__name__, type(model).__name__]}
for name, case in json.load(open("cases.json")).items():
    if "messages" in case:
        x = processor.apply_chat_template(
            case["messages"], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    else:
        images = [Image.open(path) for path in case["images"]]
        x = processor(images=images, text=case["text"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**x).logits
        generated = model.generate(**x, max_new_tokens=12, do_sample=False)
    out[name] = {"inputs": dict(x), "logits": logits, "generated": generated}
torch.save(out, out_path)
"""
QUESTION = "What colour is the shape?"
# Raw LLaVA-style text: with our wrappers (the sequence the model was trained on) and bare, as lmms-eval writes it.
RAW_CASES = {
    "raw_wrapped": "<|vision_start|><image><|vision_end|>" + QUESTION,
    "raw_bare": "<image>\n" + QUESTION,
}


def run_fresh(exported, folder, cases: dict) -> dict:
    """Run `cases` through the export in a fresh process with no access to the repo; what it computed, by case."""
    (folder / "script.py").write_text(FRESH_PROCESS_SCRIPT)
    (folder / "cases.json").write_text(json.dumps(cases))
    # -I: isolated mode, so neither the repo nor PYTHONPATH is on sys.path; cwd is elsewhere too.
    cmd = [sys.executable, "-I", "script.py", str(exported), "out.pt"]
    run = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(folder / "out.pt")


def ours(model, processor, case: dict) -> dict:
    """The same case through our own processor and model."""
    if "messages" in case:
        x = processor.apply_chat_template(
            case["messages"], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    else:
        x = processor(images=[Image.open(p) for p in case["images"]], text=case["text"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**x).logits
        generated = model.generate(**x, max_new_tokens=12, do_sample=False)
    return {"inputs": dict(x), "logits": logits, "generated": generated}


def as_ours(input_ids: torch.Tensor, exported, model) -> torch.Tensor:
    """The export's input_ids with its image token (`<image>`) swapped back for ours (`<|image_pad|>`)."""
    llava_image_id = json.loads((exported / "config.json").read_text())["image_token_index"]
    return input_ids.masked_fill(input_ids == llava_image_id, model.config.image_token_id)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported through the command line entry point."""
    dst = tmp_path_factory.mktemp("export") / "llava"
    main(["--model", str(tiny_checkpoint), "--output", str(dst)])
    return dst


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(folder, cases): a chat turn with two images saved as files, so both processes read the same pixels, and the
    raw-text cases over the first image."""
    folder = tmp_path_factory.mktemp("chat")
    shape_image("red").save(folder / "red.png")
    shape_image("blue", box=(2, 20, 40, 44)).save(folder / "blue.png")
    content = [
        {"type": "image", "image": str(folder / "red.png")},
        {"type": "text", "text": "Compare"},
        {"type": "image", "image": str(folder / "blue.png")},
        {"type": "text", "text": QUESTION},
    ]
    cases = {"chat": {"messages": [{"role": "user", "content": content}]}}
    cases |= {name: {"text": text, "images": [str(folder / "red.png")]} for name, text in RAW_CASES.items()}
    return folder, cases


@pytest.fixture(scope="module")
def fresh(exported, chat):
    """What the export computes in a fresh process, per case."""
    folder, cases = chat
    return run_fresh(exported, folder, cases)


@pytest.fixture(scope="module")
def original(tiny, chat):
    """The chat through our own processor and model."""
    _, cases = chat
    return ours(*tiny, cases["chat"])


def test_exported_llava_loads_without_remote_code_and_gives_same_logits(fresh, original):
    assert fresh["classes"] == ["LlavaProcessor", "LlavaForConditionalGeneration"]
    torch.testing.assert_close(fresh["chat"]["logits"], original["logits"], rtol=0, atol=1e-6)


def test_quickstart_checkpoint_exports_and_answers_alike(quickstart_run, tmp_path):
    """The README's route: `export_llava.py --model outputs/quickstart/sft` on the trained default (its tokenizer once
    filled the embedding rows exactly, leaving no spare row for `<image>`), then the same held-out caption."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    checkpoint = quickstart_run["checkpoint"]
    main(["--model", str(checkpoint), "--output", str(tmp_path / "llava")])
    data = checkpoint.parent / "data"
    row = json.loads((data / "caption_test.jsonl").read_text().splitlines()[2])  # three shapes
    question = row["conversations"][0]["content"].removeprefix("<image>\n")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(data / row["image"])},
                                             {"type": "text", "text": question}]}]  # fmt: skip
    cases = {"caption": {"messages": messages}}
    fresh = run_fresh(tmp_path / "llava", tmp_path, cases)["caption"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    original = ours(model, AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True), cases["caption"])
    torch.testing.assert_close(fresh["logits"], original["logits"], rtol=0, atol=1e-5)
    prompt_length = original["inputs"]["input_ids"].shape[1]
    assert torch.equal(fresh["generated"][0, prompt_length:], original["generated"][0, prompt_length:])


def test_exported_llava_greedy_generation_matches(fresh, original):
    prompt_length = original["inputs"]["input_ids"].shape[1]
    new = original["generated"][0, prompt_length:]
    assert len(set(new.tolist())) > 1  # a varied continuation, so agreement is not a coincidence
    assert torch.equal(fresh["chat"]["generated"][0, prompt_length:], new)


def test_exported_chat_is_our_sequence_with_image_as_image_token(fresh, original, exported, tiny):
    model, processor = tiny
    ours_x, theirs = original["inputs"], fresh["chat"]["inputs"]
    assert set(theirs) == set(ours_x) == {"input_ids", "attention_mask", "pixel_values"}
    # Only the id at image positions differs: <image> there, <|image_pad|> in ours.
    assert not torch.equal(theirs["input_ids"], ours_x["input_ids"])
    assert torch.equal(as_ours(theirs["input_ids"], exported, model), ours_x["input_ids"])
    for key in ("attention_mask", "pixel_values"):
        assert torch.equal(theirs[key], ours_x[key]), key
    assert int((ours_x["input_ids"] == processor.image_token_id).sum()) == 2 * processor.num_image_tokens
    assert ours_x["pixel_values"].shape[0] == 2


def test_exported_raw_llava_text_with_wrappers_gives_our_logits(fresh, tiny, chat, exported):
    model, _ = tiny
    _, cases = chat
    # Ours reads a bare <image> as the wrapped triple (and would wrap a wrapped <image> again).
    mine = ours(model, tiny[1], {**cases["raw_wrapped"], "text": "<image>" + QUESTION})
    theirs = fresh["raw_wrapped"]
    assert torch.equal(as_ours(theirs["inputs"]["input_ids"], exported, model), mine["inputs"]["input_ids"])
    torch.testing.assert_close(theirs["logits"], mine["logits"], rtol=0, atol=1e-6)
    assert torch.equal(theirs["generated"][0, -12:], mine["generated"][0, -12:])


def test_exported_bare_image_placeholder_is_one_image(fresh, tiny, exported):
    """`<image>\\n...` with no wrappers (lmms-eval's raw prompts): the image fills its positions, nothing else."""
    model, processor = tiny
    theirs = fresh["raw_bare"]
    ids = theirs["inputs"]["input_ids"]
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert int((as_ours(ids, exported, model) == model.config.image_token_id).sum()) == processor.num_image_tokens
    assert vision_start not in ids  # bare: no wrappers are added
    with torch.no_grad():  # the same sequence through our model, with our image id at the same positions
        mine = model(input_ids=as_ours(ids, exported, model), pixel_values=theirs["inputs"]["pixel_values"]).logits
    torch.testing.assert_close(theirs["logits"], mine, rtol=0, atol=1e-6)


def test_exported_tokenizer_has_image_token_at_first_free_id_and_weights_unchanged(exported, tiny, tiny_bases):
    model, _ = tiny
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_bases[1])
    tokenizer = AutoTokenizer.from_pretrained(exported)
    image_id = json.loads((exported / "config.json").read_text())["image_token_index"]
    assert image_id == len(base_tokenizer) < model.config.text_config.vocab_size  # a spare embedding row
    assert tokenizer("a<image>b", add_special_tokens=False).input_ids[1] == image_id
    assert tokenizer.decode([image_id], skip_special_tokens=True) == ""  # special: not echoed in answers
    weights = load_file(exported / "model.safetensors")
    embeddings = weights["language_model.model.embed_tokens.weight"]
    assert torch.equal(embeddings, model.model.language_model.embed_tokens.weight)


def test_exported_processor_refuses_image_pad_as_image_in_raw_text(exported, chat):
    """On the export `<|image_pad|>` is plain text: with an image and no `<image>`, the processor says so."""
    from transformers import AutoProcessor

    folder, _ = chat
    processor = AutoProcessor.from_pretrained(exported)
    with pytest.raises(ValueError):
        processor(images=[Image.open(folder / "red.png")], text="<|image_pad|>What colour?", return_tensors="pt")


def test_export_refuses_a_tokenizer_with_no_spare_embedding_row(tiny):
    model, processor = tiny
    config = QwenSiglipConfig.from_dict(model.config.to_dict())
    config.text_config.vocab_size = len(processor.tokenizer)  # every row already names a token
    with pytest.raises(ValueError, match=r"No spare embedding row for '<image>'.*vocab_size > len\(tokenizer\)"):
        llava_processor(processor, config)


def test_export_refuses_a_tokenizer_that_already_has_image_token(tiny):
    _, processor = tiny
    tokenizer = AutoTokenizer.from_pretrained(processor.tokenizer.name_or_path)
    tokenizer.add_tokens(["<image>"])
    with pytest.raises(ValueError, match="already has a '<image>' token"):
        add_image_token(tokenizer, text_vocab_size=10**6)


@pytest.fixture(scope="module")
def qwen_checkpoint(qwen_tiny, tmp_path_factory):
    """conftest's tiny model on the real Qwen tokenizer (151,936 embedding rows), saved as a checkpoint folder."""
    model, processor = qwen_tiny
    checkpoint = tmp_path_factory.mktemp("qwen-checkpoint")
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    return model, processor, checkpoint


def test_export_on_the_real_qwen_vocab_takes_first_free_id_and_gives_same_logits(qwen_checkpoint, chat, tmp_path):
    model, processor, checkpoint = qwen_checkpoint
    _, cases = chat
    dst = export(checkpoint, tmp_path / "llava")
    image_id = json.loads((dst / "config.json").read_text())["image_token_index"]
    # This tokenizer has 151,669 entries (Qwen2.5: 151,665); the embedding matrix 151,936 rows.
    assert (len(processor.tokenizer), image_id, model.config.image_token_id) == (151669, 151669, 151655)
    cases = {"chat": cases["chat"], "raw_wrapped": cases["raw_wrapped"]}
    fresh_out = run_fresh(dst, tmp_path, cases)
    for name, mine in [
        ("chat", ours(model, processor, cases["chat"])),
        ("raw_wrapped", ours(model, processor, {**cases["raw_wrapped"], "text": "<image>" + QUESTION})),
    ]:
        theirs = fresh_out[name]
        assert torch.equal(as_ours(theirs["inputs"]["input_ids"], dst, model), mine["inputs"]["input_ids"]), name
        torch.testing.assert_close(theirs["logits"], mine["logits"], rtol=0, atol=1e-6, msg=name)


def test_exported_folder_is_plain_llava_in_the_llava_hf_layout(exported, tiny):
    model, _ = tiny
    assert not list(exported.glob("*.py"))
    for path in exported.glob("*.json"):
        assert "auto_map" not in path.read_text() and "QwenSiglip" not in path.read_text(), path.name
    config = json.loads((exported / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llava", ["LlavaForConditionalGeneration"])
    assert (config["vision_feature_select_strategy"], config["vision_feature_layer"]) == ("full", -1)
    assert config["image_token_index"] != model.config.image_token_id  # <image>, not <|image_pad|>
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
