"""Test helper: run a training stage exactly as its script (`train_pretrain.py`, `train_sft.py`, `train_dpo.py`,
`train_grpo.py`) does, plus test-only callbacks.

    python tests/stage_runner.py {pretrain,sft,dpo,grpo} <training arguments...>      (or under torchrun)

Environment switches (test use only):
- QS_DUMP_WEIGHTS=<dir>: every rank writes its final trainable weights to <dir>/rank<N>.pt.
- QS_DUMP_ARGS=<dir>: every rank writes <dir>/args<N>.json: gradient accumulation, processes seen by the launcher
  and by TrainingArguments, as the Trainer was built.
- QS_KILL_AT_STEP=<n>: the process SIGKILLs itself right after the checkpoint of step n is written, as a crash would.
- QS_KILL_IN_SAVE=<n>: SIGKILL in the middle of the checkpoint of step n: weights written, optimizer and
  trainer_state.json not (a node preempted during a save).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout under test, before any installed copy
from qwen_siglip import stage3, training  # noqa: E402


class DumpWeights(TrainerCallback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", 0))
        weights = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        torch.save(weights, self.folder / f"rank{rank}.pt")


class DumpArgs(TrainerCallback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_init_end(self, args, state, control, **kwargs):
        rank = int(os.environ.get("RANK", 0))
        seen = dict(gradient_accumulation_steps=args.gradient_accumulation_steps, args_world_size=args.world_size,
                    env_world_size=int(os.environ.get("WORLD_SIZE", 1)))  # fmt: skip
        (self.folder / f"args{rank}.json").write_text(json.dumps(seen))


def kill_in_save(step: int) -> None:
    """Trainer saves weights, then optimizer/scheduler, RNG, and trainer_state.json last: die between the first two."""
    save_optimizer = Trainer._save_optimizer_and_scheduler  # every stage's trainer inherits it

    def dying(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = dying


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: like a preempted node


if __name__ == "__main__":
    stage, argv = sys.argv[1], sys.argv[2:]
    callbacks = []
    if os.environ.get("QS_DUMP_WEIGHTS"):
        callbacks.append(DumpWeights(os.environ["QS_DUMP_WEIGHTS"]))
    if os.environ.get("QS_DUMP_ARGS"):
        callbacks.append(DumpArgs(os.environ["QS_DUMP_ARGS"]))
    if os.environ.get("QS_KILL_IN_SAVE"):
        kill_in_save(int(os.environ["QS_KILL_IN_SAVE"]))
    if os.environ.get("QS_KILL_AT_STEP"):
        callbacks.append(KillAfterSave(int(os.environ["QS_KILL_AT_STEP"])))
    main = stage3.main if stage in ("dpo", "grpo") else training.main
    main(stage, argv, callbacks)
