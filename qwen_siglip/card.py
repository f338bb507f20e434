"""The model card (README.md) and loss plot written next to every trained checkpoint, and evaluation results in it.

Notable:
- The YAML header is what the Hub indexes: `library_name`, `pipeline_tag`, `base_model` (the stage's starting
  checkpoint, or the two bases of stage 1) with `base_model_relation`, `datasets`, `license`, tags. Only names that
  are Hub ids go there, so the Hub links the model tree; a local folder is named by its last component in the body,
  so no path of the training machine ends up on the Hub.
- `base_model_relation` is explicit: with two bases listed the Hub would otherwise infer a "merge".
- The body states the real hyperparameters, the epochs and steps actually run (`--max_steps` may stop a run early)
  and the final loss, read from the trainer's state.
- `write_model_index` puts evaluation scores into the card's `model-index` metadata (what the Hub shows), keeping
  the rest of the card.
"""

from pathlib import Path

from qwen_siglip.hub import display_name, hub_ids

SFT = "TRL's `SFTTrainer`, cross-entropy on the assistant's tokens only"
HOW_TRAINED = {  # stage -> the sentence the card says about its objective
    "pretrain": SFT,
    "sft": SFT,
    "dpo": "preference pairs with TRL's `DPOTrainer` (the starting checkpoint, frozen, is the reference model), "
    "log-probabilities on the answer's tokens only",
    "grpo": "TRL's `GRPOTrainer`: answers sampled from the model itself, scored by reward functions, and each "
    "answer weighted by how it scored against the others to the same prompt",
}
# Curves the plot shows beside the loss: GRPO's mean reward, DPO's chosen-minus-rejected reward margin.
REWARD_CURVES = {"reward": "mean reward", "rewards/margins": "reward margin (chosen - rejected)"}


def _curve(log_history: list[dict], key: str) -> list[tuple]:
    return [(h["step"], h[key]) for h in log_history if key in h]


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    """Training (and eval) loss against step, and stage 3's reward beside it, as a PNG; None if nothing was logged."""
    train, evals = _curve(log_history, "loss"), _curve(log_history, "eval_loss")
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rewards = {label: curve for key, label in REWARD_CURVES.items() if (curve := _curve(log_history, key))}
    fig, axes = plt.subplots(1, 1 + bool(rewards), figsize=(6 + 5 * bool(rewards), 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    for label, curve in rewards.items():
        axes[0, 1].plot(*zip(*curve), label=label)
        axes[0, 1].set(xlabel="step", ylabel="reward", title="Reward")
    for a in axes[0]:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def card_header(script_args, model_args, bases: list[str], tags: tuple[str, ...] = ("sft",)) -> list[str]:
    """The YAML header lines: what the Hub indexes. Only Hub ids are linked."""
    header = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"license: {script_args.license}",
    ]
    if base_models := hub_ids(*bases):
        adapter = model_args.use_peft and not script_args.merge_adapter  # the folder holds only LoRA weights
        header += ["base_model:"] + [f"- {b}" for b in base_models]
        header.append(f"base_model_relation: {'adapter' if adapter else 'finetune'}")
    if datasets := hub_ids(script_args.dataset_name):
        header += ["datasets:"] + [f"- {d}" for d in datasets]
    tags = ("qwen-siglip", "vision-language", "image-text-to-text", "trl", *tags)
    return header + ["tags:"] + [f"- {t}" for t in tags] + ["---"]


def settings_table(state, args, script_args, model_args, model, bases: list[str], processes: int = 1) -> list[str]:
    """The run's real settings as markdown rows: read from the arguments and the trainer's state, not a recipe."""
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    projector_lr = f" (projector {script_args.projector_lr:g})" if script_args.projector_lr else ""
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    rows = {
        "started from": ", ".join(display_name(b) for b in bases),
        "data": display_name(script_args.dataset_name),
        "modules trained": ", ".join(script_args.train_modules) + (" (LoRA on the LM)" if model_args.use_peft else ""),
        "learning rate": f"{args.learning_rate:g}{projector_lr}",
        "schedule": f"{schedule}, warm-up {args.warmup_steps:g}",
        "global batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * processes,
        "epochs / steps": f"{round(state.epoch or 0, 2):g} / {state.global_step}",  # run, not configured
        "max length": getattr(args, "max_length", None),
        "final training loss": f"{losses[-1]:.4f}" if losses else "n/a",
        "image tokens per image": model.config.num_image_tokens,
        **stage3_rows(state, args, script_args),
    }
    return ["| setting | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows.items() if v is not None]


def stage3_rows(state, args, script_args) -> dict:
    """DPO's and GRPO's own settings and results, read from their TRL config and the logs (none for SFT)."""
    if not hasattr(args, "beta"):
        return {}
    last = {k: v for h in state.log_history for k, v in h.items()}  # the last logged value of every key
    rows = {"beta (KL to the reference)": f"{args.beta:g}"}
    if hasattr(args, "num_generations"):  # GRPO
        rows["rewards"] = ", ".join(getattr(script_args, "reward_funcs", []) or []) or None
        rows["answers per prompt / max answer tokens"] = f"{args.num_generations} / {args.max_completion_length}"
        rows["sampling temperature"] = f"{args.temperature:g}"
        rows["final mean reward"] = f"{last['reward']:.4f}" if "reward" in last else None
    else:  # DPO
        rows["loss"] = ", ".join(args.loss_type)
        margin = last.get("rewards/margins")
        rows["final reward margin / accuracy"] = None if margin is None else (
            f"{margin:.4f} / {last.get('rewards/accuracies', float('nan')):.2f}")  # fmt: skip
    return rows


def write_model_card(
    output_dir: str, state, args, script_args, model_args, model, processes: int = 1, stage: str = "sft"
) -> Path:
    """Write README.md into output_dir from the run's arguments and trainer state (`processes`: ranks that trained)."""
    start = model_args.model_name_or_path
    bases = [start] if start else [script_args.vision_model, script_args.text_model]
    name = args.hub_model_id or Path(output_dir).name
    header = card_header(script_args, model_args, bases, tags=(stage,))
    table = settings_table(state, args, script_args, model_args, model, bases, processes)
    plot = "![training loss](loss.png)" if (Path(output_dir) / "loss.png").exists() else ""
    c = model.config
    body = f"""
# {name}

A QwenSiglip vision-language model: a SigLIP vision encoder ({c.vision_config.image_size} px,
{c.vision_config.patch_size} px patches) and a Qwen2 language model ({c.text_config.num_hidden_layers} layers, hidden
{c.text_config.hidden_size}) joined by a two-layer MLP projector. Projected patch features take the place of the image
tokens in the language model's input; the language model writes the answer.

## Training

Trained with the qwen-siglip trainer on {HOW_TRAINED[stage]}.

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


# ----------------------------------------------------------------------------- evaluation results: model-index

CARD_METRICS = {  # summary key -> (metric type, pretty name)
    "exact_match": ("exact_match", "Exact match"),
    "blind_exact_match": ("blind_exact_match", "Exact match, blind baseline (the highest)"),
    "bleu4": ("bleu", "BLEU-4"),
    "cider": ("cider", "CIDEr-D"),
    "blind_cider": ("blind_cider", "CIDEr-D, blind baseline (the highest)"),
}
SUMMARY_ONLY = {"examples", "skipped", "blind"}  # summary keys that are not metrics; any other (a scorer's) is one


def write_model_index(
    model_dir: str | Path, summary: dict, dataset: str, split: str | None = None, limit: int | None = None
) -> Path:
    """Put `summary`'s scores into `<model_dir>/README.md` as `model-index` metadata; the rest of the card is kept.

    Results of an earlier evaluation on the same dataset and split are replaced, those on other datasets kept.
    """
    from huggingface_hub import EvalResult, ModelCard

    path = Path(model_dir) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\n---\n")
    name = display_name(dataset)
    pretty = f"{name} (first {limit} examples)" if limit else name
    metrics = {**CARD_METRICS}
    metrics.update({k: (k, k.replace("_", " ")) for k in summary if k not in metrics and k not in SUMMARY_ONLY})
    results = [
        EvalResult(
            task_type="image-text-to-text",
            dataset_type=name,
            dataset_name=pretty,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(summary[key], 4),
        )
        for key, (metric_type, metric_name) in metrics.items()
        if summary.get(key) is not None
    ]
    ours = (results[0].task_type, name, split) if results else None
    earlier = [r for r in card.data.eval_results or [] if (r.task_type, r.dataset_type, r.dataset_split) != ours]
    card.data.eval_results = earlier + results
    card.data.model_name = card.data.model_name or Path(model_dir).resolve().name
    card.save(path)
    return path
