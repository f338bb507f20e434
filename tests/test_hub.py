"""Hub behaviour: Auto classes in a fresh process, pipeline, root config.json, strict builder, card metadata."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, build_tiny, shape_image, user_turn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, pipeline

FRESH_PROCESS_SCRIPT = """
import sys, torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
try:
    import modeling_qwen_siglip
    sys.exit("the repo is importable: this process is not fresh")
except ImportError:
    pass
folder, inputs_path, out_path = sys.argv[1:]
x = torch.load(inputs_path)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(processor).__name__ == "QwenSiglipProcessor"
x2 = processor(images=[Image.open("img.png")], text=open("prompt.txt").read(), return_tensors="pt")
assert torch.equal(x2["input_ids"], x["input_ids"]) and torch.equal(x2["pixel_values"], x["pixel_values"])
out = {}
for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
    model = auto.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    model, info = model
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        out[auto.__name__] = model(**x).logits
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    out["AutoModel"] = base(**x).last_hidden_state
torch.save(out, out_path)
"""


def test_saved_checkpoint_loads_in_fresh_process(tiny, tiny_checkpoint, tmp_path):
    model, processor = tiny
    text = processor.apply_chat_template(user_turn("What colour?"), add_generation_prompt=True)
    images = [shape_image("green")]
    x = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        expected = model(**x)
        hidden = model.model(**x).last_hidden_state
    torch.save(dict(x), tmp_path / "inputs.pt")
    images[0].save(tmp_path / "img.png")
    (tmp_path / "prompt.txt").write_text(text)
    (tmp_path / "script.py").write_text(FRESH_PROCESS_SCRIPT)
    # -I: isolated mode, so neither the repo nor PYTHONPATH is on sys.path; cwd is elsewhere too.
    cmd = [sys.executable, "-I", "script.py", str(tiny_checkpoint), "inputs.pt", "out.pt"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["AutoModelForCausalLM"], expected.logits)
    assert torch.equal(out["AutoModelForImageTextToText"], expected.logits)
    assert torch.equal(out["AutoModel"], hidden)


def test_checkpoint_folder_is_self_contained(tiny_checkpoint):
    files = {p.name for p in tiny_checkpoint.iterdir()}
    for name in ("configuration_qwen_siglip.py", "modeling_qwen_siglip.py", "processing_qwen_siglip.py"):
        assert name in files
    auto_map = json.loads((tiny_checkpoint / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}
    assert "AutoProcessor" in json.loads((tiny_checkpoint / "processor_config.json").read_text())["auto_map"]
    weights = load_file(tiny_checkpoint / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied to the embeddings, as in Qwen2.5-0.5B
    assert not any(".head." in k or k.startswith("model.vision_tower.head") for k in weights)


def test_pipeline_answers_chat_with_pil_image_path_and_batch(tiny_checkpoint, tmp_path):
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint), trust_remote_code=True)
    path = tmp_path / "img.png"
    shape_image("blue").save(path)

    def chat(image):
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]

    single = pipe(text=chat(shape_image()), max_new_tokens=4, return_full_text=False)
    assert isinstance(single[0]["generated_text"], str) and single[0]["generated_text"]
    from_path = pipe(text=chat(str(path)), max_new_tokens=4, return_full_text=False)
    assert from_path[0]["generated_text"]
    batch = pipe(text=[chat(shape_image()), chat(str(path))], max_new_tokens=4, return_full_text=False, batch_size=2)
    assert [b[0]["generated_text"] for b in batch] == [single[0]["generated_text"], from_path[0]["generated_text"]]


def test_root_config_json_is_the_published_default_architecture():
    config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (896, 24, 14, 2)
    assert (t.intermediate_size, t.vocab_size, t.rms_norm_eps, t.tie_word_embeddings) == (4864, 151936, 1e-6, True)
    assert t.rope_parameters["rope_theta"] == 1e6
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (768, 12, 12, 3072)
    assert (v.image_size, v.patch_size, v.vision_use_head) == (224, 16, False)
    assert (config.image_token_id, config.num_image_tokens, config.tie_word_embeddings) == (151655, 196, True)


def test_builder_loads_every_base_weight_strictly(tiny_bases):
    vision_dir, text_dir = tiny_bases
    model, processor = build_tiny(tiny_bases, spread=False)
    vision = load_file(vision_dir / "model.safetensors")
    text = load_file(text_dir / "model.safetensors")
    for name, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, vision[f"vision_model.{name}"]), name
    for name, tensor in model.model.language_model.state_dict().items():
        assert torch.equal(tensor, text[f"model.{name}"]), name
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not hasattr(model.model.vision_tower, "head")  # SigLIP's pooling head is dropped on purpose


def test_builder_fails_loudly_on_a_missing_tensor(tiny_bases, tmp_path):
    vision_dir, text_dir = tiny_bases
    broken = tmp_path / "broken_qwen"
    broken.mkdir()
    for f in text_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not fit the architecture.*layers\.1\.mlp\.up_proj"):
        build_tiny((vision_dir, broken), spread=False)


def test_builder_fails_loudly_on_a_missing_vision_tensor(tiny_bases, tmp_path):
    vision_dir, text_dir = tiny_bases
    broken = tmp_path / "broken_siglip"
    broken.mkdir()
    for f in vision_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not fit the architecture.*q_proj"):
        build_tiny((broken, text_dir), spread=False)


# ----------------------------------------------------------------------------- the model card's metadata


def card_header(tmp_path, tiny, start=None, bases=("google/siglip-base-patch16-224", "Qwen/Qwen2.5-0.5B-Instruct"),
                dataset="lmms-lab/LLaVA-OneVision-Data", use_peft=False) -> dict:  # fmt: skip
    """The YAML header write_model_card gives a run with these names (a 0.25-epoch, 2-step run)."""
    from types import SimpleNamespace as NS

    from qwen_siglip.card import write_model_card

    state = NS(log_history=[{"step": 2, "loss": 1.5}], epoch=0.25, global_step=2)
    args = NS(per_device_train_batch_size=2, gradient_accumulation_steps=2, hub_model_id=None, learning_rate=1e-3,
              lr_scheduler_type="cosine", warmup_steps=0.03, max_length=256)  # fmt: skip
    script_args = NS(vision_model=bases[0], text_model=bases[1], dataset_name=dataset, license="apache-2.0",
                     train_modules=["projector"], projector_lr=None, merge_adapter=False)  # fmt: skip
    model_args = NS(model_name_or_path=start, use_peft=use_peft)
    card = write_model_card(str(tmp_path), state, args, script_args, model_args, tiny[0], processes=2).read_text()
    assert "| global batch | 8 |" in card and "| epochs / steps | 0.25 / 2 |" in card
    return yaml.safe_load(card.split("---")[1])


def test_card_links_the_two_hub_bases_and_the_hub_dataset(tiny, tmp_path):
    header = card_header(tmp_path, tiny)
    assert header["base_model"] == ["google/siglip-base-patch16-224", "Qwen/Qwen2.5-0.5B-Instruct"]
    assert header["base_model_relation"] == "finetune"  # two bases would otherwise read as a merge on the Hub
    assert header["datasets"] == ["lmms-lab/LLaVA-OneVision-Data"]


def test_card_links_the_starting_checkpoint_and_an_unmerged_lora_as_adapter(tiny, tmp_path):
    header = card_header(tmp_path, tiny, start="someone/qwen-siglip-pretrain", use_peft=True)
    assert header["base_model"] == ["someone/qwen-siglip-pretrain"] and header["base_model_relation"] == "adapter"


def test_card_never_names_a_local_path(tiny, tiny_bases, shapes_data, tmp_path):
    vision, text = map(str, tiny_bases)
    header = card_header(tmp_path, tiny, bases=(vision, text), dataset=str(shapes_data["pretrain"]))
    assert "base_model" not in header and "datasets" not in header
    card = (tmp_path / "README.md").read_text()
    assert str(tiny_bases[0].parent) not in card and str(shapes_data["pretrain"].parent) not in card
    header = card_header(tmp_path, tiny, start="./stage1", dataset="../train")  # owner/name-shaped, yet local
    assert "base_model" not in header and "datasets" not in header
