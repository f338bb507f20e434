"""Stage 3, preference and reward tuning: the one implementation behind `train_dpo.py` and `train_grpo.py`.

Notable:
- TRL's `DPOTrainer` and `GRPOTrainer` do the work (losses, reference model, generation, rewards); this module
  gives them the stage machinery stages 1 and 2 have (training.py): the model from a stage-2 folder,
  `--train_modules`, LoRA with `--merge_adapter`, resume, the progress line, the loss and reward plot, the model
  card, the filtered push, bad-record accounting. Data comes through training.load_datasets with preferences.py's
  loaders, so every check of the data module applies.
- The reference model is the frozen starting point. Full training: TRL loads a second copy from the starting
  folder, through our own classes (`register_auto_classes`: no remote code runs, no `trust_remote_code` needed).
  LoRA: no copy at all; TRL disables the adapter to get the reference (with `modules_to_save`, the projector's
  original weights).
- DPO batches come from our PairCollator (completion = the answer and `<|im_end|>`, as SFT labels it; truncation
  never cuts an image), and QwenSiglipDPOTrainer keeps image tokens and padding out of the log-probabilities.
- GRPO generates with our model's own `generate` (pixel_values at prefill, KV cache on, stop at `<|im_end|>`,
  `<|image_pad|>` suppressed), `num_generations` answers per prompt, batched as TRL batches them.
- Pitfall, GRPO: GRPOConfig derives its generation batch from the gradient accumulation when it is built, before
  `--global_batch_size` sets the accumulation; `with_accumulation` parses twice, so it is derived from the real one
  (one generation round per optimizer step) unless `--steps_per_generation`/`--generation_batch_size` say otherwise.
"""

import sys
from pathlib import Path

from transformers import AutoConfig, AutoModelForImageTextToText

from configuration_qwen_siglip import QwenSiglipConfig
from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
from qwen_siglip import training
from qwen_siglip.pair_collator import PairCollator
from qwen_siglip.preferences import load_pairs, prompt_loader
from qwen_siglip.rewards import load_reward
from qwen_siglip.trainer import ProgressLog, QwenSiglipDPOTrainer, QwenSiglipGRPOTrainer


def register_auto_classes() -> None:
    """Let transformers' Auto classes build our model from its config without remote code: TRL loads the DPO and
    GRPO reference model from the starting folder through `AutoModelForImageTextToText`."""
    AutoConfig.register(QwenSiglipConfig.model_type, QwenSiglipConfig, exist_ok=True)
    AutoModelForImageTextToText.register(QwenSiglipConfig, QwenSiglipForConditionalGeneration, exist_ok=True)


def with_accumulation(argv: list[str] | None) -> list[str]:
    """GRPO: the command line with the gradient accumulation `--global_batch_size` asks for, spelled out, so that
    GRPOConfig derives its generation batch from it (one generation round per optimizer step, TRL's default)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    script_args, training_args, _ = training.parse_args("grpo", argv)
    if not script_args.global_batch_size:
        return argv
    training.set_accumulation(training_args, script_args.global_batch_size)
    return [*argv, "--gradient_accumulation_steps", str(training_args.gradient_accumulation_steps)]


def check_stage3(script_args, training_args, model_args) -> None:
    """Refuse what stage 3 cannot do, before anything loads."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: stage 3 starts from a trained (stage-2) checkpoint")
    if script_args.group_by_length or getattr(training_args, "padding_free", False):
        raise ValueError("--group_by_length and --padding_free are stage 1 and 2 batching; stage 3 pads its batches")


def build_trainer(stage: str, argv: list[str] | None = None, callbacks: list | None = None) -> tuple:
    """(trainer, processor, train set, collate skips, script_args, model_args, taken, resume): ready to train."""
    argv = with_accumulation(argv) if stage == "grpo" else argv
    script_args, training_args, model_args, taken, resume = training.prepare(stage, argv)
    check_stage3(script_args, training_args, model_args)
    register_auto_classes()
    model, processor = training.build_model(script_args, model_args)
    training.freeze(model, script_args.train_modules)
    common = dict(
        model=model,
        args=training_args,
        processing_class=processor,
        peft_config=training.peft_config(model_args, script_args.train_modules) if model_args.use_peft else None,
        callbacks=[ProgressLog(), *(callbacks or [])],
        projector_lr=script_args.projector_lr,
        card_info=training.card_info(stage, script_args, training_args, model_args, model),
    )
    if stage == "dpo":
        train, evals = training.load_datasets(script_args, loader=load_pairs)
        collator = PairCollator(processor, max_length=training_args.max_length, strict=script_args.strict)
        trainer = QwenSiglipDPOTrainer(**common, data_collator=collator, **hf_sets(train, evals))
        skips = collator.skipped
    else:
        loader = prompt_loader(processor, script_args.max_prompt_length)
        train, evals = training.load_datasets(script_args, loader=loader)
        rewards = [load_reward(spec) for spec in script_args.reward_funcs]
        trainer = QwenSiglipGRPOTrainer(**common, reward_funcs=rewards, **hf_sets(train, evals))
        skips = {}  # GRPO batches prompts as they are (no collator): every skip happens at load
    return trainer, processor, train, skips, script_args, model_args, taken, resume


def hf_sets(train, evals) -> dict:
    """TRL's trainers take `datasets` objects only; to_hf() wraps ours without decoding anything up front."""
    return dict(train_dataset=train.to_hf(), eval_dataset=evals.to_hf() if evals is not None else None)


def main(stage: str, argv: list[str] | None = None, callbacks: list | None = None) -> Path:
    """Run stage 3, "dpo" or "grpo"; returns the output folder."""
    return training.finish(*build_trainer(stage, argv, callbacks))
