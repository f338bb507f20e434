"""Training: both stages, LoRA, push, distributed ranks, resume, quickstart (labels and truncation: test_labels.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CPU_RUN, ROOT, shape_image
from safetensors.torch import load_file
from transformers import TrainerCallback

import training
from collator import VLMCollator

RUNNER = str(ROOT / "tests" / "stage_runner.py")


def chat(*turns: str, system: str | None = None, images: int = 1) -> dict:
    """An example in TRL's conversational format: user/assistant texts alternate, images go in the first turn."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        content = [{"type": "image"}] * (images if i == 0 else 0) + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return {"messages": messages, "images": [shape_image(c) for c in ["red", "blue", "green"][:images]]}


# ----------------------------------------------------------------------------- the collator (labels: test_labels.py)


def test_batch_of_only_bad_examples_raises_with_reasons(tiny):
    _, processor = tiny
    collator = VLMCollator(processor, max_length=12)
    with pytest.raises(ValueError, match="too_long_image_would_be_cut"):
        collator([chat("describe", "red")])


# ----------------------------------------------------------------------------- recipes and arguments


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses_with_the_stage_parser(recipe):
    defaults = training.PRETRAIN_DEFAULTS if "pretrain" in recipe.name else training.SFT_DEFAULTS
    cpu = ["--use_cpu", "true", "--bf16", "false"]  # the GPU recipes ask for bf16, which refuses to parse on a CPU
    script_args, args, model_args = training.parse_args(defaults, ["--config", str(recipe), *cpu])
    assert set(script_args.train_modules) <= set(training.MODULES)
    assert args.learning_rate > 0


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_name_a_distributed_setup(config):
    settings = yaml.safe_load(config.read_text())
    assert settings["distributed_type"] in {"MULTI_GPU", "DEEPSPEED", "FSDP"}
    assert settings["mixed_precision"] == "bf16" and settings["num_processes"] > 1


def test_unknown_train_module_is_refused(tiny_bases, shapes_data, tmp_path):
    with pytest.raises(ValueError, match="--train_modules: unknown"):
        pretrain(tiny_bases, shapes_data, tmp_path, "--train_modules", "projector", "decoder")


# ----------------------------------------------------------------------------- the stages


def pretrain(bases, data, out: Path, *extra: str) -> Path:
    vision, text = map(str, bases)
    argv = ["--vision_model", vision, "--text_model", text, "--dataset_name", str(data["pretrain"])]
    return training.main(training.PRETRAIN_DEFAULTS, argv + ["--output_dir", str(out), *CPU_RUN, "--max_steps", "2"]
                         + list(extra))  # fmt: skip


def sft(start: Path, data, out: Path, *extra: str, callbacks: list | None = None) -> Path:
    argv = ["--model_name_or_path", str(start), "--dataset_name", str(data["sft_train"]), "--output_dir", str(out)]
    return training.main(training.SFT_DEFAULTS, argv + [*CPU_RUN, "--max_steps", "2", *extra], callbacks)


class RecordOptimizer(TrainerCallback):
    """Keeps (learning rate, parameter names) of each optimizer group as training starts."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        # initial_lr: the peak rate each group was given; "lr" already holds the warm-up's first value, 0
        self.groups = [(g["initial_lr"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


@pytest.fixture(scope="module")
def stage1(tiny_bases, shapes_data, tmp_path_factory) -> Path:
    return pretrain(tiny_bases, shapes_data, tmp_path_factory.mktemp("stage1"), "--report_to", "tensorboard")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_stage1_freezes_everything_but_the_projector(tiny):
    model, _ = tiny
    model = type(model)(model.config)
    training.freeze(model, ["projector"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.multi_modal_projector.") for n in trainable)


def test_stage1_leaves_the_base_weights_untouched(tiny_bases, stage1):
    vision = load_file(tiny_bases[0] / "model.safetensors")
    text = load_file(tiny_bases[1] / "model.safetensors")
    after = weights(stage1)
    for key, value in after.items():
        if key.startswith("model.vision_tower."):
            torch.testing.assert_close(value, vision["vision_model." + key.removeprefix("model.vision_tower.")])
        elif key.startswith("model.language_model."):
            torch.testing.assert_close(value, text["model." + key.removeprefix("model.language_model.")])


def test_stage1_output_is_exactly_what_goes_to_the_hub(stage1):
    files = {p.name for p in stage1.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json", "README.md", "loss.png",
                "configuration_qwen_siglip.py", "modeling_qwen_siglip.py", "processing_qwen_siglip.py",
                "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"}  # fmt: skip
    assert expected <= files, expected - files
    config = json.loads((stage1 / "config.json").read_text())
    assert {"AutoConfig", "AutoModelForCausalLM", "AutoModelForImageTextToText"} <= set(config["auto_map"])
    card = (stage1 / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "image-text-to-text"
    assert header["license"] == "apache-2.0" and "qwen-siglip" in header["tags"]
    assert "| epochs / steps | 1 / 2 |" in card and "final training loss" in card and "loss.png" in card
    assert str(stage1.parent) not in card  # no path of the training machine in a public card


def test_report_to_tensorboard_writes_event_files(stage1):
    assert list(stage1.rglob("events.out.tfevents.*"))


def test_stage2_learns_projector_and_lm_and_answers_through_pipeline_in_fresh_process(stage1, shapes_data, tmp_path):
    recorder = RecordOptimizer()
    out = sft(stage1, shapes_data, tmp_path / "sft", "--projector_lr", "1e-2", callbacks=[recorder])
    lrs = {lr for lr, names in recorder.groups for n in names if "multi_modal_projector" in n}
    lm_lrs = {lr for lr, names in recorder.groups for n in names if "language_model" in n}
    assert lrs == {1e-2} and lm_lrs == {training.SFT_DEFAULTS["learning_rate"]}
    before, after = weights(stage1), weights(out)
    assert changed(before, after, "model.multi_modal_projector.")
    assert changed(before, after, "model.language_model.")
    assert not changed(before, after, "model.vision_tower.")
    image = tmp_path / "red.png"
    shape_image("red", size=32).save(image)
    code = f"""
from transformers import pipeline
pipe = pipeline("image-text-to-text", model={str(out)!r}, trust_remote_code=True)
image = {{"type": "image", "url": {str(image)!r}}}
messages = [{{"role": "user", "content": [image, {{"type": "text", "text": "what?"}}]}}]
out = pipe(text=messages, max_new_tokens=4, return_full_text=False)
print("ANSWER", repr(out[0]["generated_text"]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ANSWER '" in result.stdout


def test_lora_sft_trains_adapters_and_merges_into_a_plain_checkpoint(stage1, shapes_data, tmp_path):
    out = sft(stage1, shapes_data, tmp_path / "lora", "--use_peft", "true", "--lora_r", "4", "--merge_adapter", "true",
              "--learning_rate", "1e-2")  # fmt: skip
    assert not (out / "adapter_config.json").exists()
    before, after = weights(stage1), weights(out)
    assert set(before) == set(after)  # plain keys: no lora_A/B, no base_layer, no modules_to_save copies
    assert changed(before, after, "model.language_model.layers.")  # the merged adapter moved the LM's linears
    assert changed(before, after, "model.multi_modal_projector.")
    assert not changed(before, after, "model.vision_tower.")


def test_push_to_hub_uploads_the_output_folder_once_at_the_end(stage1, shapes_data, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    api = huggingface_hub.HfApi
    monkeypatch.setattr(api, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(api, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "https://hf.co/x")
    out = sft(stage1, shapes_data, tmp_path / "pushed", "--push_to_hub", "true", "--hub_model_id", "someone/tiny-vlm")
    assert [c[0] for c in calls] == ["create", "upload"] and calls[0][1] == "someone/tiny-vlm"
    upload = calls[1][1]
    assert upload["repo_id"] == "someone/tiny-vlm" and Path(upload["folder_path"]) == out
    assert "checkpoint-*" in upload["ignore_patterns"]
    card = (out / "README.md").read_text()
    assert "# someone/tiny-vlm" in card and 'from_pretrained("someone/tiny-vlm"' in card


# ----------------------------------------------------------------------------- processes: ranks, crashes


def run_stage(args: list[str], env: dict, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [RUNNER, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def sft_args(stage1: Path, data, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model_name_or_path", str(stage1), "--dataset_name", str(data["sft_train"]),
            "--output_dir", str(out), *CPU_RUN, *extra]  # fmt: skip


def test_two_cpu_ranks_end_with_identical_weights(stage1, shapes_data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    args = sft_args(stage1, shapes_data, tmp_path / "ddp", "--max_steps", "3", "--per_device_train_batch_size", "2",
                    "--global_batch_size", "4", "--ddp_backend", "gloo")  # fmt: skip
    result = run_stage(args, {"QS_DUMP_WEIGHTS": str(tmp_path)}, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert changed(weights(stage1), weights(tmp_path / "ddp"), "model.language_model.")  # and they did train


def test_resume_after_sigkill_gives_the_same_weights_as_an_unbroken_run(stage1, shapes_data, tmp_path):
    steps = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    unbroken = run_stage(sft_args(stage1, shapes_data, tmp_path / "unbroken", *steps), {})
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    crashed = run_stage(sft_args(stage1, shapes_data, tmp_path / "crashed", *steps), {"QS_KILL_AT_STEP": "2"})
    assert crashed.returncode == -9  # SIGKILL, right after checkpoint-2 was written
    crashed_dir = tmp_path / "crashed"
    assert (crashed_dir / "checkpoint-2").is_dir() and not (crashed_dir / "model.safetensors").exists()

    resume = ["--resume_from_checkpoint", str(tmp_path / "crashed" / "checkpoint-2")]
    resumed = run_stage(sft_args(stage1, shapes_data, tmp_path / "crashed", *steps, *resume), {})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "unbroken"), weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


# ----------------------------------------------------------------------------- the embedded default


def test_quickstart_learns_to_look_at_the_image(quickstart_run):
    """The smaller embedded default: >= 90% held-out exact match, while blank images do no better than chance."""
    assert quickstart_run["exact_match"] >= 0.90, quickstart_run
    assert quickstart_run["blind_exact_match"] <= quickstart_run["chance"] + 0.05, quickstart_run
