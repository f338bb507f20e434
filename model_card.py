"""The model card (README.md) and loss plot written next to every trained checkpoint.

Notable:
- The YAML header is what the Hub indexes: `library_name`, `pipeline_tag`, `base_model` (the stage's starting
  checkpoint, or the two bases of stage 1) with `base_model_relation`, `datasets`, `license`, tags. Only names that
  are Hub ids go there, so the Hub links the model tree; a local folder is named by its last component in the body,
  so no path of the training machine ends up on the Hub.
- `base_model_relation` is explicit: with two bases listed the Hub would otherwise infer a "merge".
- The body states the real hyperparameters, the epochs and steps actually run (`--max_steps` may stop a run early)
  and the final loss, read from the trainer's state.
"""

import re
from pathlib import Path

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_ids(*names: str | None) -> list[str]:
    """Names that are Hub ids (owner/name) and not local folders ("./x", "../x" and existing paths are local)."""
    return [n for n in names if n and HUB_ID.match(n) and not n.startswith(".") and not Path(n).exists()]


def display_name(name: str | None) -> str:
    return "" if not name else name if hub_ids(name) else Path(name).name


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    """Training (and eval) loss against step, as a PNG; None if nothing was logged."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_model_card(output_dir: str, state, args, script_args, model_args, model, processes: int = 1) -> Path:
    """Write README.md into output_dir from the run's arguments and trainer state (`processes`: ranks that trained)."""
    start = model_args.model_name_or_path
    bases = [start] if start else [script_args.vision_model, script_args.text_model]
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    name = args.hub_model_id or Path(output_dir).name
    header = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    header.append(f"license: {script_args.license}")
    if base_models := hub_ids(*bases):
        adapter = model_args.use_peft and not script_args.merge_adapter  # the folder holds only LoRA weights
        header += ["base_model:"] + [f"- {b}" for b in base_models]
        header.append(f"base_model_relation: {'adapter' if adapter else 'finetune'}")
    if datasets := hub_ids(script_args.dataset_name):
        header += ["datasets:"] + [f"- {d}" for d in datasets]
    header += ["tags:", "- qwen-siglip", "- vision-language", "- image-text-to-text", "- trl", "- sft", "---"]
    c = model.config
    rows = {
        "started from": ", ".join(display_name(b) for b in bases),
        "data": display_name(script_args.dataset_name),
        "modules trained": ", ".join(script_args.train_modules) + (" (LoRA on the LM)" if model_args.use_peft else ""),
        "learning rate": f"{args.learning_rate:g}"
        + (f" (projector {script_args.projector_lr:g})" if script_args.projector_lr else ""),
        "schedule": f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, warm-up "
        f"{args.warmup_steps:g}",
        "global batch": global_batch,
        "epochs / steps": f"{round(state.epoch or 0, 2):g} / {state.global_step}",  # run, not configured
        "max length": args.max_length,
        "final training loss": f"{losses[-1]:.4f}" if losses else "n/a",
        "image tokens per image": c.num_image_tokens,
    }
    table = ["| setting | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows.items()]
    plot = "![training loss](loss.png)" if (Path(output_dir) / "loss.png").exists() else ""
    body = f"""
# {name}

A QwenSiglip vision-language model: a SigLIP vision encoder ({c.vision_config.image_size} px,
{c.vision_config.patch_size} px patches) and a Qwen2 language model ({c.text_config.num_hidden_layers} layers, hidden
{c.text_config.hidden_size}) joined by a two-layer MLP projector. Projected patch features take the place of the image
tokens in the language model's input; the language model writes the answer.

## Training

Trained with the qwen-siglip trainer on TRL's `SFTTrainer`, cross-entropy on the assistant's tokens only.

{chr(10).join(table)}

{plot}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoProcessor
from PIL import Image

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("photo.jpg")], text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Or `pipeline("image-text-to-text", model="{name}", trust_remote_code=True)`.
"""
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(header) + "\n" + body)
    return path
