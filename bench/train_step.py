"""The training-step benchmark: SFTTrainer's step on ours, LLaVA and ours-ps2, interleaved, paired ratios.

Notable:
- The step is SFTTrainer's: TRL's `add_fused_lm_head` patch (what SFTTrainer installs), forward with
  `fused_lm_head=True`, backward, clip_grad_norm_(1.0), fused AdamW (the Trainer default), zero_grad. Stage 1
  trains the projector, stage 2 projector + LM (training.freeze), with activation checkpointing in stage 2 as
  train_sft.py's defaults and the SFT recipes.
- Checkpointing is where ours and LLaVA part: enabling it (Trainer: gradient_checkpointing_enable) also calls
  enable_input_require_grads, which hooks every sub-model's input embeddings, SigLIP's patch embedding included.
  LLaVA then backpropagates through (and recomputes) its frozen tower: more FLOPs per stage-2 step (the table's
  GFLOP column). Ours runs a frozen tower under no_grad, so the hook cannot reach it.
- Order: ours-ps2 first in every repeat, then ours and LLaVA alternating which goes first, after an untimed
  full-size step. A step that follows a smaller one (or the memory probes' heap trim) pays page faults to regrow the
  heap: a plain rotation of three would always put ours right after ours-ps2 and make it look slower than LLaVA.
- The models share weights and optimizer state, so `step MB` (peak minus resident before the step) is what tells
  rows apart. `saved MB` (tensors autograd keeps for backward, parameters excluded) and `grad MB` are exact.
- FLOPs are counted by torch.utils.flop_counter over one real step (every matmul and attention, forward and
  backward; frozen weights get no weight-gradient matmul since autograd runs none). MFU = FLOPs / median step time
  / the better of two timings of a square matmul (fp32 2048^3 on CPU, bf16 8192^3 on GPU), first and last in the run.
"""

import argparse
import gc
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from trl.trainer.utils import add_fused_lm_head

from bench.machine import MemoryProbe, sync
from bench.models import LLAVA, OURS, OURS_PS2
from qwen_siglip.training import freeze

CHECKPOINTING = {"recipe": "stage 2, as train_sft.py", "off": "off", "on": "both stages"}
STAGES = {1: ["projector"], 2: ["projector", "language_model"]}
aten = torch.ops.aten
# CPU attention runs a flash kernel that torch's counter does not list; it computes what the GPU one does.
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *a, **kw: sdpa_backward_flop_count(grad, q, k, v)
    ),
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a step dispatches: equal counts mean ours and LLaVA do the same work, whatever the noise."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def saved_tensor_meter(exclude: set[int]):
    """Bytes of the distinct storages autograd saves for backward, parameters (in `exclude`) left out."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def step(model, batch: dict, optimizer, params: list, device: str, record: dict | None = None) -> tuple[float, float]:
    """One SFTTrainer step: (forward + backward seconds, clip + optimizer seconds). With `record`, also count the
    step's FLOPs, the activations autograd saves and the gradients it makes (slower: time it only without)."""
    sync(device)
    t0 = time.perf_counter()
    if record is None:
        model(**batch, fused_lm_head=True, use_cache=False).loss.backward()
    else:
        exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as flops, OpCounter() as ops:
            with saved_tensor_meter(exclude) as saved:
                out = model(**batch, fused_lm_head=True, use_cache=False)
            out.loss.backward()
        record.update(
            flops=flops.get_total_flops(),
            ops=ops.count,
            saved_mb=sum(saved.values()) / 2**20,
            grad_mb=sum(p.grad.nbytes for p in params if p.grad is not None) / 2**20,
        )
    sync(device)
    t1 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # the Trainer's max_grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def make_optimizer(params: list) -> torch.optim.Optimizer:
    """The Trainer's default (fused AdamW, no weight decay), its state allocated now: not inside a measured step."""
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: the weights do not move
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def running_orders(names: list[str], repeats: int):
    """Each repeat's running order: ours-ps2 first, then ours and LLaVA, which of the two goes first alternating.

    Why: a step after a smaller one (ours-ps2) pays page faults to grow the heap again. A plain rotation of three
    would always put the same model right after ours-ps2, slowing it; this way ours and LLaVA
    each follow it equally often, and ours-ps2 always follows a model of the full size.
    """
    pair = [n for n in names if n != OURS_PS2]
    for r in range(repeats):
        yield r, [OURS_PS2, *(pair if r % 2 == 0 else pair[::-1])]


def bench_training(models: dict, batches: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    probe = MemoryProbe(args.device)
    for stage, modules in STAGES.items():
        for model in models.values():
            freeze(model, modules)  # the recipes' freeze; the models share parameters, so this is idempotent
            model.train()
            if args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "recipe" and stage == 2):
                model.activation_checkpointing_enable()  # what Trainer does for gradient_checkpointing=True
            add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer installs
        params = list({id(p): p for m in models.values() for p in m.parameters() if p.requires_grad}.values())
        optimizer = make_optimizer(params)  # one optimizer: a model's step leaves no state for the others to pay
        stats = {name: {"compute": [], "optim": [], "busy": []} for name in models}
        for name, model in models.items():  # warm-up step: FLOPs, saved tensors, gradients and peak memory
            probe.start()
            step(model, batches[name], optimizer, params, args.device, record=stats[name])
            stats[name]["peak_mb"], stats[name]["step_mb"] = probe.stop()
        # The probes trimmed the heap; regrow it outside the timings, or the first full-size step pays the page
        # faults.
        step(models[OURS], batches[OURS], optimizer, params, args.device)
        for r, order in running_orders(list(models), args.repeats):
            for name in order:
                stats[name]["busy"].append(args.gate.wait())
                compute, optim = step(models[name], batches[name], optimizer, params, args.device)
                stats[name]["compute"].append(compute)
                stats[name]["optim"].append(optim)
            took = ", ".join(f"{n} {s['compute'][-1] + s['optim'][-1]:.2f}s" for n, s in stats.items())
            print(f"  stage {stage} repeat {r + 1}: {took}", flush=True)
        for s in stats.values():
            s["times"] = [c + o for c, o in zip(s["compute"], s["optim"])]
        for name, s in stats.items():
            rows.append(_training_row(stage, name, models[name], batches[name], s, stats[LLAVA]))
        for model in models.values():
            del model.forward  # drop the fused-head patch: generation runs the model's own forward
            if model.is_activation_checkpointing:
                model.activation_checkpointing_disable()
        del optimizer, params
        gc.collect()
    return rows


def _paired(own: list[float], base: list[float]) -> tuple[float, list[float]]:
    """Speed ratio from times: median over repeats of base time / own time (same repeat), and its range."""
    ratios = [b / t for t, b in zip(own, base)]
    return statistics.median(ratios), [min(ratios), max(ratios)]


def _training_row(stage: int, name: str, model, batch: dict, s: dict, llava: dict) -> dict:
    t = statistics.median(s["times"])
    n_samples, n_tokens = batch["input_ids"].shape[0], int(batch["attention_mask"].sum())
    speed, speed_range = _paired(s["times"], llava["times"])
    return {
        "stage": stage,
        "model": name,
        "image_tokens": model.config.image_seq_length if name == LLAVA else model.config.num_image_tokens,
        "batch": n_samples,
        "tokens_per_batch": n_tokens,  # non-padding tokens, image tokens included
        "step_s": t,
        "step_s_all": s["times"],
        "forward_backward_s": statistics.median(s["compute"]),
        "cpu_busy_before": s["busy"],  # share of the CPU others used right before each timed step
        "optimizer_s": statistics.median(s["optim"]),
        "samples_per_s": n_samples / t,
        "tokens_per_s": n_tokens / t,
        "speed_vs_llava": speed,  # samples/s ratio; equals the tokens/s ratio at equal image tokens
        "speed_vs_llava_range": speed_range,
        "forward_backward_speed_vs_llava": _paired(s["compute"], llava["compute"])[0],
        "flops_per_step": s["flops"],
        "aten_ops_per_step": s["ops"],  # forward + backward
        "flops_per_s": s["flops"] / t,
        "peak_mb": s["peak_mb"],
        "step_mb": s["step_mb"],
        "saved_mb": s["saved_mb"],
        "grad_mb": s["grad_mb"],
    }
