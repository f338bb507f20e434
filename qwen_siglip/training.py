"""The stage machinery: `train_pretrain.py` and `train_sft.py` run `main` here; stage 3 (`train_dpo.py`,
`train_grpo.py`, qwen_siglip/stage3.py) shares the rest: parse, build, freeze, load, train, save, card, push.

Notable:
- Stages differ in their defaults (`STAGES`) and TRL config (`STAGE_CLASSES`): which modules learn, the learning
  rate, the global batch, DPO's beta, GRPO's generations. A recipe YAML (`--config`) overrides them; the command
  line overrides both.
- Stage 1 composes the model from two base checkpoints (`--vision_model`, `--text_model`); a later stage starts
  from a QwenSiglip checkpoint (`--model_name_or_path`).
- Every field of TRL's config that we override is set in one place, `override_trl_args`, with the reason for each.
- Labels come from our collator (assistant tokens only). TRL's own dataset preparation is skipped: the data module
  already gives TRL's conversational format and images are decoded lazily, per batch.
- `--global_batch_size` sets gradient accumulation from the per-device batch and the number of processes, read from
  the launcher (`WORLD_SIZE`), not from TrainingArguments, which has read 1 while two processes ran
  (`accelerate launch` with a DeepSpeed config on a machine without a GPU).
- `--push_to_hub` is handled here, once, at the end, through `hub.push_folder`: the output folder exactly as it is
  on disk, less checkpoints, TensorBoard runs, `training_args.bin` and (unless `--push_eval`) `eval/`.
- Secrets and paths: `--hub_token` is taken out of the arguments before anything is saved (checkpoints pickle them),
  and the sub-configs forget the local folders they were loaded from, so no pushed file names the token or a path
  of the training machine.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import set_seed
from trl import DPOConfig, GRPOConfig, ModelConfig, SFTConfig, TrlParser

from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
from processing_qwen_siglip import QwenSiglipProcessor
from qwen_siglip import packing
from qwen_siglip.card import plot_loss
from qwen_siglip.checkpoints import resolve_resume
from qwen_siglip.compose import compose
from qwen_siglip.data import load_vlm_dataset, require_usable
from qwen_siglip.hub import push_folder
from qwen_siglip.images import MAX_PIXELS
from qwen_siglip.trainer import ProgressLog, QwenSiglipTrainer

logger = logging.getLogger(__name__)

# What `--train_modules` may name, and where each lives in the model.
MODULES = {
    "projector": "model.multi_modal_projector",
    "language_model": "model.language_model",
    "vision_tower": "model.vision_tower",
}
# LoRA goes on the LM's linear layers only; the vision tower keeps its weights and the projector trains fully.
LM_LINEAR_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

COMMON_DEFAULTS = dict(
    lr_scheduler_type="cosine",
    warmup_steps=0.03,  # a ratio of the total steps when < 1
    num_train_epochs=1,
    logging_steps=10,
    save_strategy="steps",
    save_steps=500,
    save_total_limit=2,
    report_to="tensorboard",
    max_length=2048,
    activation_checkpointing=False,
)
STAGES = {
    # LLaVA-1.5 stage 1: only the projector learns, at a high rate, with a large batch.
    "pretrain": dict(
        COMMON_DEFAULTS,
        train_modules=["projector"],
        learning_rate=1e-3,
        per_device_train_batch_size=32,
        global_batch_size=256,
        output_dir="outputs/qwen-siglip-pretrain",
    ),
    # LLaVA-1.5 stage 2: projector and LM learn (or LoRA on the LM), vision stays frozen.
    "sft": dict(
        COMMON_DEFAULTS,
        train_modules=["projector", "language_model"],
        learning_rate=2e-5,
        per_device_train_batch_size=16,
        global_batch_size=128,
        activation_checkpointing=True,
        output_dir="outputs/qwen-siglip-sft",
    ),
    # Stage 3, preference pairs: projector and LM move, gently (DPO drifts fast at SFT's rate), from the SFT model.
    "dpo": dict(
        COMMON_DEFAULTS,
        train_modules=["projector", "language_model"],
        learning_rate=5e-7,
        beta=0.1,
        per_device_train_batch_size=8,
        global_batch_size=64,
        activation_checkpointing=True,
        output_dir="outputs/qwen-siglip-dpo",
    ),
    # Stage 3, verifiable rewards: 8 answers per prompt, short answers (VQA-style), no KL term (TRL's default).
    "grpo": dict(
        COMMON_DEFAULTS,
        train_modules=["projector", "language_model"],
        learning_rate=1e-6,
        per_device_train_batch_size=8,
        global_batch_size=64,
        num_generations=8,
        max_completion_length=64,
        activation_checkpointing=True,
        output_dir="outputs/qwen-siglip-grpo",
    ),
}


@dataclass
class ScriptArguments:
    dataset_name: str = field(
        default=None, metadata={"help": "A local .json/.jsonl/.parquet file or folder in any supported format, or a "
                                "Hub dataset id."}
    )  # fmt: skip
    image_root: str | None = field(default=None, metadata={"help": "Folder images are read from (and only from)."})
    dataset_train_split: str = "train"
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Optional held-out set, same formats."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream a Hub dataset (needs --max_steps)."})
    strict: bool = field(default=False, metadata={"help": "Stop at the first bad record instead of skipping it."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N records."})
    max_pixels: int = field(default=MAX_PIXELS, metadata={"help": "Skip images with more pixels (from the header)."})
    vision_model: str = field(default="google/siglip-base-patch16-224", metadata={"help": "Stage 1 vision base."})
    text_model: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "Stage 1 language base."})
    pixel_shuffle_factor: int = field(default=1, metadata={"help": "Stage 1: 2 merges 2x2 patches (4x fewer)."})
    train_modules: list[str] = field(
        default_factory=lambda: ["projector"], metadata={"help": f"Modules that learn, among {list(MODULES)}."}
    )
    projector_lr: float | None = field(default=None, metadata={"help": "Learning rate of the projector alone."})
    global_batch_size: int | None = field(default=None, metadata={"help": "Sets gradient accumulation steps."})
    merge_adapter: bool = field(default=False, metadata={"help": "With --use_peft: save a merged plain model."})
    push_eval: bool = field(default=False, metadata={"help": "With --push_to_hub: upload <output_dir>/eval too."})
    group_by_length: bool = field(default=False, metadata={"help": "Padded batches of samples of similar length."})
    license: str = "apache-2.0"


@dataclass
class GRPOScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={"help": "Rewards, summed: exact_match, length_format, or module:function (a TRL reward function, or "
                  "a scorer f(prediction, reference) as evaluate_vlm.py's --scorer)."},
    )  # fmt: skip
    max_prompt_length: int | None = field(
        default=1024, metadata={"help": "Skip (and count) prompts longer than this, image tokens included."}
    )


# Each stage's TRL config and script arguments (the parser's dataclasses besides ModelConfig).
STAGE_CLASSES = {
    "pretrain": (SFTConfig, ScriptArguments),
    "sft": (SFTConfig, ScriptArguments),
    "dpo": (DPOConfig, ScriptArguments),
    "grpo": (GRPOConfig, GRPOScriptArguments),
}


def parse_args(stage: str, argv: list[str] | None = None, config_class=None, script_class=None):
    """TRL's parser over (the stage's script arguments, its TRL config, ModelConfig), with the stage's defaults
    under the YAML's (`--config`) and the command line's."""
    default_config, default_script = STAGE_CLASSES[stage]
    parser = TrlParser((script_class or default_script, config_class or default_config, ModelConfig))
    parser.set_defaults_with_config(**STAGES[stage])
    return parser.parse_args_and_config(argv)


def build_model(script_args: ScriptArguments, model_args: ModelConfig):
    """(model, processor): stage 1 composes them from two bases; later stages load a QwenSiglip checkpoint."""
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        kwargs = dict(dtype=dtype, attn_implementation=model_args.attn_implementation)
        model = QwenSiglipForConditionalGeneration.from_pretrained(path, **kwargs)
        # Pitfall: the tokenizer loader reads config.json, sees its auto_map and would stop to ask, on a terminal,
        # whether to run the folder's code. It runs none here (Qwen2's tokenizer is built in): say so up front.
        processor = QwenSiglipProcessor.from_pretrained(path, trust_remote_code=True)
    else:
        vision, text = script_args.vision_model, script_args.text_model
        model, processor = compose(vision, text, dtype=dtype, pixel_shuffle_factor=script_args.pixel_shuffle_factor)
        if model_args.attn_implementation:
            model.set_attn_implementation(model_args.attn_implementation)
    # Pitfall: each sub-config keeps the folder it was loaded from in `_name_or_path`, and config.json (in every
    # checkpoint and on the Hub) would carry it. The card names the bases; the config needs no path.
    for sub in (model.config.text_config, model.config.vision_config):
        sub.name_or_path = ""
    return model, processor


def freeze(model: QwenSiglipForConditionalGeneration, train_modules: list[str]) -> None:
    """Only the named modules learn. A tied lm_head is the embedding matrix, so it learns with the LM."""
    unknown = set(train_modules) - set(MODULES)
    if unknown:
        raise ValueError(f"--train_modules: unknown {sorted(unknown)}; choose among {list(MODULES)}")
    model.requires_grad_(False)
    for name in train_modules:
        model.get_submodule(MODULES[name]).requires_grad_(True)
    if "language_model" in train_modules:
        model.lm_head.requires_grad_(True)


def peft_config(model_args: ModelConfig, train_modules: list[str]):
    """LoRA on the LM's linear layers; every other module named in train_modules trains in full."""
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or LM_LINEAR_LAYERS,
        modules_to_save=[MODULES[m].split(".")[-1] for m in train_modules if m != "language_model"],
        task_type="CAUSAL_LM",
    )


def num_processes(training_args) -> int:
    """How many processes train: torchrun and `accelerate launch` (one node or several) export WORLD_SIZE."""
    launched = os.environ.get("WORLD_SIZE")
    return int(launched) if launched else training_args.world_size


def set_accumulation(training_args, global_batch_size: int | None) -> None:
    """Gradient accumulation from the wanted global batch, the per-device batch and the number of processes."""
    if not global_batch_size:
        return
    per_step = training_args.per_device_train_batch_size * num_processes(training_args)
    training_args.gradient_accumulation_steps = max(1, math.ceil(global_batch_size / per_step))
    if global_batch_size % per_step:
        logger.warning(
            f"global batch {global_batch_size} is not a multiple of {per_step} (per-device x processes): using "
            f"{training_args.gradient_accumulation_steps * per_step}"
        )


def override_trl_args(training_args, script_args) -> dict:
    """Every field of TRL's config we override, each with its reason. Returns what we take over from TRL:
    `push`, `hub_token`, `packing` and `padding_free`, which this module then does itself."""
    taken = dict(push=training_args.push_to_hub, hub_token=training_args.hub_token)
    # Our collator needs the raw `messages`/`images` columns and builds labels itself.
    training_args.remove_unused_columns = False
    # The data module already gives TRL's conversational format, images decoded lazily: nothing to prepare.
    if hasattr(training_args, "dataset_kwargs"):  # SFT's; DPO and GRPO skip preparation for image data themselves
        training_args.dataset_kwargs = {"skip_prepare_dataset": True}
    # Pushed once, at the end, through our filtered upload (push_folder), not by the Trainer at every save.
    training_args.push_to_hub = False
    # The Trainer pickles its arguments into training_args.bin (the final folder and every checkpoint): a token
    # left in them is a secret on disk, and on the Hub if that folder is ever pushed.
    training_args.hub_token = None
    # TRL refuses packing and padding-free for vision data; ours do both (packing.py), so TRL's stay off.
    if hasattr(training_args, "packing"):
        taken["packing"] = bool(training_args.packing)
        taken["padding_free"] = bool(training_args.padding_free or training_args.packing)
        training_args.packing = training_args.padding_free = False
    # The global batch counts the processes the launcher started, which TrainingArguments may misread.
    set_accumulation(training_args, script_args.global_batch_size)
    return taken


def check_args(script_args, training_args, taken: dict) -> None:
    """Refuse argument combinations that cannot work, before anything is loaded."""
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required (a local file or folder, or a Hub dataset id)")
    if script_args.dataset_streaming and training_args.max_steps <= 0:
        raise ValueError("--dataset_streaming needs --max_steps: a stream has no length to count epochs by")
    if taken["push"] and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name")


def load_datasets(script_args, split: str | None = None, loader=load_vlm_dataset):
    """(train, eval or None) through the data module, with the run's image root, pixel cap and strictness.
    `loader` takes load_vlm_dataset's arguments; stage 3 passes preferences.py's. A set with no usable record is
    refused here, before any trainer is built (`require_usable`)."""
    load = dict(image_root=script_args.image_root, streaming=script_args.dataset_streaming,
                strict=script_args.strict, max_pixels=script_args.max_pixels)  # fmt: skip
    split = split or script_args.dataset_train_split
    train = loader(script_args.dataset_name, split=split, limit=script_args.max_samples, **load)
    evals = loader(script_args.eval_dataset_name, **load) if script_args.eval_dataset_name else None
    for dataset in (train, evals):
        if dataset is not None:  # pitfall: not `if dataset`: an empty map-style dataset is falsy
            require_usable(dataset)
    return train, evals


def prepare(stage: str, argv: list[str] | None = None) -> tuple:
    """(script_args, training_args, model_args, taken, resume): parsed, overridden, checked, before anything loads."""
    script_args, training_args, model_args = parse_args(stage, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    taken = override_trl_args(training_args, script_args)
    check_args(script_args, training_args, taken)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)  # before the projector's random init, which the Trainer's own seeding comes after
    return script_args, training_args, model_args, taken, resume


def card_info(stage: str, script_args, training_args, model_args, model) -> dict:
    """What the model card reads besides the trainer's state (StageMixin's `card_info`)."""
    processes = num_processes(training_args)
    return dict(script_args=script_args, model_args=model_args, model=model, processes=processes, stage=stage)


def main(stage: str, argv: list[str] | None = None, callbacks: list | None = None) -> Path:
    """Run stage 1 or 2 ("pretrain" or "sft"); returns the output folder."""
    script_args, training_args, model_args, taken, resume = prepare(stage, argv)
    model, processor = build_model(script_args, model_args)
    freeze(model, script_args.train_modules)
    train, evals = load_datasets(script_args)
    collator, batch_sampler = packing.batching(
        processor, model, train, padding_free=taken["padding_free"], packing=taken["packing"],
        group_by_length=script_args.group_by_length, max_length=training_args.max_length,
        rows=training_args.per_device_train_batch_size, seed=training_args.seed, strict=script_args.strict,
    )  # fmt: skip
    trainer = QwenSiglipTrainer(
        model=model,
        args=training_args,
        # SFTTrainer takes `datasets` objects only; to_hf() wraps ours without decoding anything up front.
        train_dataset=train.to_hf(),
        eval_dataset=evals.to_hf() if evals is not None else None,
        processing_class=processor,
        data_collator=collator,
        train_batch_sampler=batch_sampler,
        peft_config=peft_config(model_args, script_args.train_modules) if model_args.use_peft else None,
        callbacks=[ProgressLog(), *(callbacks or [])],
        projector_lr=script_args.projector_lr,
        card_info=card_info(stage, script_args, training_args, model_args, model),
    )
    return finish(trainer, processor, train, collator.skipped, script_args, model_args, taken, resume)


def finish(trainer, processor, train, collate_skips, script_args, model_args, taken: dict, resume) -> Path:
    """Train (resuming if asked), report the skips, save weights, plot and card, push once; the output folder."""
    logger.info(f"trainable parameters: {sum(p.numel() for p in trainer.model.parameters() if p.requires_grad):,}")
    trainer.train(resume_from_checkpoint=resume)
    report_skips(train, collate_skips, trainer.args.dataloader_num_workers)
    out = save(trainer, processor, script_args.merge_adapter and model_args.use_peft)
    if taken["push"] and trainer.is_world_process_zero():
        push = dict(private=trainer.args.hub_private_repo, token=taken["hub_token"], push_eval=script_args.push_eval)
        push_folder(out, trainer.args.hub_model_id, **push)
    return out


def report_skips(train, collate_skips: dict, workers: int) -> None:
    """One line with every skip of the run: at load, at decode, at collate."""
    # Pitfall: with dataloader_num_workers > 0, decode and collate run in worker processes and count there.
    where = " (this process only: workers count their own)" if workers else ""
    logger.info(f"data: skipped at load {dict(train.skipped)}, at decode {train.late_summary()}, "
                f"at collate {dict(collate_skips)}{where}")  # fmt: skip


def save(trainer, processor, merge: bool) -> Path:
    """Weights (merged if asked), processor, loss plot and model card: the folder that goes to the Hub."""
    out = Path(trainer.args.output_dir)
    if merge:
        merged = trainer.model.merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(out)
            processor.save_pretrained(out)
    else:
        trainer.save_model(str(out))  # all ranks: FSDP / DeepSpeed gather the weights here
    if trainer.is_world_process_zero():
        plot_loss(trainer.state.log_history, out / "loss.png")
        trainer.create_model_card()
    return out
