"""The one implementation behind `train_pretrain.py` and `train_sft.py`: build, freeze, train, save, card, push.

Notable:
- The two stages differ only in their defaults (`PRETRAIN_DEFAULTS`, `SFT_DEFAULTS`): which modules learn, the
  learning rate and the global batch. A recipe YAML (`--config`) overrides them; the command line overrides both.
- Stage 1 composes the model from two base checkpoints (`--vision_model`, `--text_model`); a later stage starts
  from a QwenSiglip checkpoint (`--model_name_or_path`).
- Labels come from our collator (assistant tokens only). TRL's own dataset preparation is skipped: the data module
  already gives TRL's conversational format and images are decoded lazily, per batch.
- `--global_batch_size` sets gradient accumulation from the per-device batch and the number of processes, read from
  the launcher (`WORLD_SIZE`), not from TrainingArguments, which has read 1 while two processes ran
  (`accelerate launch` with a DeepSpeed config on a machine without a GPU).
- `--projector_lr` gives the projector its own learning rate (a parameter group), whatever else trains.
- `--push_to_hub` is handled here, once, at the end: the output folder (weights, config with auto_map, the three
  .py files, processor, generation config, model card, loss plot) is uploaded exactly as it is on disk, less
  checkpoints, TensorBoard runs, `training_args.bin` (a pickle holding local paths) and `eval/` (held-out
  references; `--push_eval true` adds it).
- Secrets and paths: `--hub_token` is taken out of the arguments before anything is saved (checkpoints pickle them),
  and the sub-configs forget the local folders they were loaded from, so no file that is pushed names the token or
  a path of the training machine.
- `--resume_from_checkpoint true` resumes from the newest *complete* `checkpoint-N` (one killed mid-save has weights
  but no `trainer_state.json`, which transformers writes last); an explicit incomplete one is refused up front.
"""

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

import packing
from data import MAX_PIXELS, load_vlm_dataset
from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
from processing_qwen_siglip import QwenSiglipProcessor

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
# LLaVA-1.5 stage 1: only the projector learns, at a high rate, with a large batch.
PRETRAIN_DEFAULTS = dict(
    COMMON_DEFAULTS,
    train_modules=["projector"],
    learning_rate=1e-3,
    per_device_train_batch_size=32,
    global_batch_size=256,
    output_dir="outputs/qwen-siglip-pretrain",
)
# LLaVA-1.5 stage 2: projector and LM learn (or LoRA on the LM), vision stays frozen.
SFT_DEFAULTS = dict(
    COMMON_DEFAULTS,
    train_modules=["projector", "language_model"],
    learning_rate=2e-5,
    per_device_train_batch_size=16,
    global_batch_size=128,
    activation_checkpointing=True,
    output_dir="outputs/qwen-siglip-sft",
)


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


def parse_args(stage_defaults: dict, argv: list[str] | None = None):
    """TRL's parser over (ScriptArguments, SFTConfig, ModelConfig), with the stage's defaults under the YAML's."""
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    parser.set_defaults_with_config(**stage_defaults)
    return parser.parse_args_and_config(argv)


def build_model(script_args: ScriptArguments, model_args: ModelConfig):
    """Stage 1 composes from bases; later stages load a QwenSiglip checkpoint."""
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    kwargs = dict(dtype=dtype, attn_implementation=model_args.attn_implementation)
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        model = QwenSiglipForConditionalGeneration.from_pretrained(path, **kwargs)
        # Pitfall: the tokenizer loader reads config.json, sees its auto_map and would stop to ask, on a terminal,
        # whether to run the folder's code. It runs none here (Qwen2's tokenizer is built in): say so up front.
        processor = QwenSiglipProcessor.from_pretrained(path, trust_remote_code=True)
    else:
        vision, text = script_args.vision_model, script_args.text_model
        model = QwenSiglipForConditionalGeneration.from_pretrained_parts(
            vision, text, dtype=dtype, pixel_shuffle_factor=script_args.pixel_shuffle_factor
        )
        if model_args.attn_implementation:
            model.set_attn_implementation(model_args.attn_implementation)
        processor = QwenSiglipProcessor.from_pretrained_parts(vision, text, model.config.num_image_tokens)
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


class QwenSiglipTrainer(SFTTrainer):
    """SFTTrainer with a separate projector learning rate and our own model card."""

    def __init__(self, *args, projector_lr: float | None = None, card_info: dict | None = None, **kwargs):
        self.train_batch_sampler = kwargs.pop("train_batch_sampler", None)  # packing.py's; None: the Trainer's own
        self.projector_lr = projector_lr
        self.card_info = card_info or {}
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.projector_lr is None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                lr = self.projector_lr if "multi_modal_projector" in name else self.args.learning_rate
                wd = self.args.weight_decay if name in decay else 0.0
                groups.setdefault((lr, wd), []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        param_groups = [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def get_train_dataloader(self):
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        return packing.train_dataloader(self, self.train_batch_sampler)

    def create_model_card(self, *args, **kwargs) -> None:
        if self.is_world_process_zero():
            from model_card import write_model_card

            write_model_card(self.args.output_dir, self.state, self.args, **self.card_info)


class ProgressLog(TrainerCallback):
    """One plain log line per logging step too, for runs whose progress bar is not on a terminal."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            logger.info(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")


def num_processes(training_args: SFTConfig) -> int:
    """How many processes train: torchrun and `accelerate launch` (one node or several) export WORLD_SIZE."""
    launched = os.environ.get("WORLD_SIZE")
    return int(launched) if launched else training_args.world_size


def set_accumulation(training_args: SFTConfig, global_batch_size: int | None) -> None:
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


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last (after weights, optimizer, RNG): a readable one means a whole save."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):  # missing, or cut short by a kill during the write
        return False


def newest_complete_checkpoint(output_dir: str) -> Path | None:
    """The complete `checkpoint-N` with the highest N in output_dir; warns about newer incomplete ones it skips."""
    folder = Path(output_dir)
    found = [p for p in folder.iterdir() if CHECKPOINT.match(p.name) and p.is_dir()] if folder.is_dir() else []
    for path in sorted(found, key=lambda p: int(CHECKPOINT.match(p.name)[1]), reverse=True):
        if is_complete(path):
            return path
        logger.warning(f"skipping {path.name}: incomplete (no readable trainer_state.json; killed during its save?)")
    return None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: "true" = the newest complete checkpoint (none: start afresh), or a path.

    Checked before the model and data load, so a bad path costs seconds, not a model load.
    """
    if not value or value.lower() == "false":
        return None
    if value.lower() == "true":
        newest = newest_complete_checkpoint(output_dir)
        if newest is None:
            logger.warning(f"--resume_from_checkpoint true: no complete checkpoint in {output_dir}; starting afresh")
        else:
            logger.info(f"resuming from {newest}")
        return None if newest is None else str(newest)
    if is_complete(Path(value)):
        return value
    newest = newest_complete_checkpoint(output_dir)
    hint = (f"the newest complete one is {newest} (`true` picks it)" if newest
            else f"there is no complete checkpoint in {output_dir}")  # fmt: skip
    problem = "does not exist" if not Path(value).exists() else "is incomplete (no readable trainer_state.json)"
    raise ValueError(f"--resume_from_checkpoint {value} {problem}; {hint}")


def main(stage_defaults: dict, argv: list[str] | None = None, callbacks: list | None = None) -> Path:
    """Run one stage; returns the output folder."""
    script_args, training_args, model_args = parse_args(stage_defaults, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required (a local file or folder, or a Hub dataset id)")
    if script_args.dataset_streaming and training_args.max_steps <= 0:
        raise ValueError("--dataset_streaming needs --max_steps: a stream has no length to count epochs by")
    # Our collator needs the raw `messages`/`images` columns and builds labels itself.
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {"skip_prepare_dataset": True}
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed once at the end, see push_folder()
    # Pitfall: Trainer pickles the arguments into training_args.bin (final folder and every checkpoint); a token
    # left in them is a secret on disk, and on the Hub if that folder is ever pushed. Keep it out of them.
    hub_token, training_args.hub_token = training_args.hub_token, None
    if push and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name")
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    set_accumulation(training_args, script_args.global_batch_size)

    model, processor = build_model(script_args, model_args)
    freeze(model, script_args.train_modules)
    load = dict(image_root=script_args.image_root, streaming=script_args.dataset_streaming, strict=script_args.strict,
                max_pixels=script_args.max_pixels)  # fmt: skip
    train = load_vlm_dataset(
        script_args.dataset_name, split=script_args.dataset_train_split, limit=script_args.max_samples, **load
    )
    evals = load_vlm_dataset(script_args.eval_dataset_name, **load) if script_args.eval_dataset_name else None
    # --padding_free/--packing/--group_by_length: ours, since TRL refuses the first two for vision data.
    collator, batch_sampler = packing.setup(training_args, script_args.group_by_length, model, processor, train)
    collator.strict = script_args.strict

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
        card_info=dict(
            script_args=script_args, model_args=model_args, model=model, processes=num_processes(training_args)
        ),
    )
    logger.info(f"trainable parameters: {sum(p.numel() for p in trainer.model.parameters() if p.requires_grad):,}")
    trainer.train(resume_from_checkpoint=resume)
    # Pitfall: with dataloader_num_workers > 0, decode and collate run in worker processes and count there.
    workers = " (this process only: workers count their own)" if training_args.dataloader_num_workers else ""
    logger.info(f"data: skipped at load {dict(train.skipped)}, at decode {dict(train.late_skipped)}, "
                f"at collate {dict(collator.skipped)}{workers}")  # fmt: skip
    out = save(trainer, processor, script_args.merge_adapter and model_args.use_peft)
    if push and trainer.is_world_process_zero():
        push_folder(out, training_args.hub_model_id, training_args.hub_private_repo, hub_token, script_args.push_eval)
    return out


def save(trainer: QwenSiglipTrainer, processor, merge: bool) -> Path:
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
        from model_card import plot_loss

        plot_loss(trainer.state.log_history, out / "loss.png")
        trainer.create_model_card()
    return out


def push_ignore_patterns(push_eval: bool = False) -> list[str]:
    """What stays local: checkpoints, TensorBoard runs (they log the output path), the pickled TrainingArguments
    (absolute paths), and unless asked the evaluation folder (held-out references and predictions)."""
    patterns = ["checkpoint-*", "checkpoint-*/**", "runs/**", "training_args.bin"]
    return patterns if push_eval else patterns + ["eval/**"]


def push_folder(
    folder: Path, repo_id: str | None, private: bool | None = None, token: str | None = None, push_eval: bool = False
) -> str:
    """Upload the output folder as it is on disk, less what push_ignore_patterns() keeps local."""
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name")
    api = HfApi(token=token)  # None: the login's token (HF_TOKEN or `hf auth login`)
    api.create_repo(repo_id, private=private, exist_ok=True)
    ignore = push_ignore_patterns(push_eval)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=ignore)
    logger.info(f"pushed {folder} to {repo_id}")
    return os.fspath(getattr(commit, "commit_url", repo_id))
