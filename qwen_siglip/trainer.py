"""What every stage adds to its TRL trainer: a projector learning rate, our batch sampler, our model card, progress.

Notable:
- `StageMixin` goes in front of a TRL trainer class: `QwenSiglipTrainer` = it + `SFTTrainer` (stages 1 and 2),
  `QwenSiglipDPOTrainer` = it + `DPOTrainer`, `QwenSiglipGRPOTrainer` = it + `GRPOTrainer` (stage 3). TRL's
  trainers stay as they are: the reference model, the losses, generation and the rewards are theirs.
- DPO's log-probabilities cover completion tokens only: the batch's `completion_mask` is ANDed with "a real token,
  not an image or vision-marker token" before TRL reads it, whatever the collator (ours, TRL's, a user's) marked.
- `--projector_lr` is a parameter group of its own, whatever else trains (weight decay as the Trainer decides).
- With a batch sampler (packing, length grouping) the training DataLoader is the Trainer's own, with that sampler
  in place of its sampler and batch size; accelerate then hands each rank its share of the micro-batches.
- The model card is ours (`card.write_model_card`), written by rank 0 only.
"""

import logging
from functools import partial

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from processing_qwen_siglip import IMAGE_TOKEN, VISION_END, VISION_START
from qwen_siglip.card import write_model_card

logger = logging.getLogger(__name__)


class StageMixin:
    """Put in front of a TRL trainer: `projector_lr`, `train_batch_sampler` and `card_info` keyword arguments."""

    def __init__(self, *args, projector_lr: float | None = None, card_info: dict | None = None,
                 train_batch_sampler=None, **kwargs):  # fmt: skip
        self.train_batch_sampler = train_batch_sampler  # None: the Trainer's own sampler
        self.projector_lr = projector_lr
        self.card_info = card_info or {}
        super().__init__(*args, **kwargs)
        if getattr(self, "ref_model", None) is not None:  # DPO's and GRPO's reference: the start, frozen for good
            self.ref_model.requires_grad_(False)

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
        return self._batch_sampler_dataloader()

    def _batch_sampler_dataloader(self) -> DataLoader:
        """The Trainer's training DataLoader, with our batch sampler in place of its sampler and batch size."""
        from transformers.trainer_utils import seed_worker

        args = self.args
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        # Several processes: accelerate wraps the batch sampler so each rank takes every world_size-th micro-batch.
        return self.accelerator.prepare(loader)

    def create_model_card(self, *args, **kwargs) -> None:
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, self.state, self.args, **self.card_info)


class QwenSiglipTrainer(StageMixin, SFTTrainer):
    """SFTTrainer with a separate projector learning rate, our batch samplers and our own model card."""


class QwenSiglipDPOTrainer(StageMixin, DPOTrainer):
    """DPOTrainer whose log-probabilities never cover an image token, a vision marker or padding."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = completion_tokens_only(inputs, self.processing_class)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def completion_tokens_only(inputs: dict, processor) -> dict:
    """The batch with `completion_mask` (2B, L) cleared on padding and on `<|vision_start|>`, `<|image_pad|>` and
    `<|vision_end|>`: what TRL scores is then completion text and `<|im_end|>` only."""
    vision = torch.tensor(processor.tokenizer.convert_tokens_to_ids([VISION_START, IMAGE_TOKEN, VISION_END]))
    ids = inputs["input_ids"]
    real = inputs["attention_mask"].bool() & ~torch.isin(ids, vision.to(ids.device))
    return {**inputs, "completion_mask": inputs["completion_mask"] * real}


class QwenSiglipGRPOTrainer(StageMixin, GRPOTrainer):
    """GRPOTrainer with the stage machinery; it generates through our model's own `generate` (pixel_values, cache)."""


PROGRESS = {"loss": "loss", "reward": "reward", "rewards/margins": "margin"}  # logged key -> name in the line


class ProgressLog(TrainerCallback):
    """One plain log line per logging step too, for runs whose progress bar is not on a terminal."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            shown = " ".join(f"{name} {logs[key]:.4f}" for key, name in PROGRESS.items() if key in logs)
            logger.info(f"step {state.global_step}/{state.max_steps} {shown}")
