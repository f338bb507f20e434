"""The packing benchmark: stage 2 on a length mix, padded (LLaVA and ours), grouped by length, padding-free, packed.

The length mix, modelled on the seed datasets (text tokens besides the 196 image tokens and the chat template's own):
- 50% captions (LLaVA-CC3M-Pretrain): "Describe ..." + a caption of 8-30 words;
- 30% short VQA (minimind-v, Chinese-LLaVA): a question of 5-15 words, an answer of 1-40;
- 20% long multi-turn (LLaVA-Instruct-150K): 2-4 turns, 250-900 words in all.
The benchmark's tokenizer is trained on these words: a word is about one token.

Notable:
- Every variant trains on the very same samples, one pass (an "epoch" of --pack-samples), with stage 2's step as the
  SFT recipe runs it (train_step.step: fused LM head, activation checkpointing, clip, fused AdamW). samples/s is
  samples over the pass's time; "vs LLaVA" is the paired ratio of pass times within a repeat.
- llava: transformers' LLaVA on padded batches as TRL builds them (random order, padded to the longest in the
  batch). ours-padded: the same batches. ours-grouped: packing.LengthGroupedBatchSampler. ours-padding-free: the
  same batches as padded, in one row. ours-packed: packing.PackedBatchSampler (rows of max_length), padding-free.
- Packing also takes fewer optimizer steps per pass (a step holds more samples): that is part of its speed, and
  why `--global_batch_size` counts rows of max_length with packing.
- Peak memory: the resident high-water mark over the whole pass (CPU; reset after a heap trim before each pass) or
  the allocator's peak (GPU).
- On a GPU the section runs with flash attention (varlen, from position_ids) when flash-attn is installed, sdpa
  otherwise; the JSON says which.
"""

import json
import random
import statistics
from pathlib import Path

from PIL import Image, ImageDraw
from trl.trainer.utils import add_fused_lm_head

from bench.machine import MemoryProbe
from bench.models import LLAVA, OURS, WORDS, to_device
from bench.train_step import _paired, make_optimizer, step
from qwen_siglip.collator import VLMCollator
from qwen_siglip.data import load_vlm_dataset
from qwen_siglip.packing import LengthGroupedBatchSampler, PackedBatchSampler, PaddingFreeCollator, cheap_lengths
from qwen_siglip.training import freeze

MIX = {"caption": 0.5, "short_vqa": 0.3, "long_multi_turn": 0.2}
VARIANTS = ["llava", "ours-padded", "ours-grouped", "ours-padding-free", "ours-packed"]
SFT_MODULES = ["projector", "language_model"]


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_mix_data(folder: Path, n: int, seed: int) -> tuple[Path, dict[str, int]]:
    """`n` LLaVA-format records in the MIX shares (stratified, shuffled), one 640x480 JPEG each."""
    rng = random.Random(seed)
    counts = {kind: round(share * n) for kind, share in MIX.items()}
    counts["caption"] += n - sum(counts.values())
    kinds = [kind for kind, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    records = []
    for i, kind in enumerate(kinds):
        image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
        ImageDraw.Draw(image).ellipse((rng.randrange(500), rng.randrange(400), 600, 460), fill=(200, 40, 40))
        image.save(folder / f"mix{i:05d}.jpg", quality=90)
        if kind == "caption":
            turns = [("<image>\nDescribe this image briefly.", _words(rng, 8, 30))]
        elif kind == "short_vqa":
            turns = [("<image>\n" + _words(rng, 5, 15)[:-1] + "?", _words(rng, 1, 40))]
        else:
            n_turns, total = rng.randint(2, 4), rng.randint(250, 900)
            per = total // (2 * n_turns)
            turns = [(("<image>\n" if t == 0 else "") + _words(rng, per // 2, per), _words(rng, per, per * 3 // 2 + 1))
                     for t in range(n_turns)]  # fmt: skip
        conversation = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        records.append({"image": f"mix{i:05d}.jpg", "conversations": conversation, "kind": kind})
    path = folder / "mix.json"
    path.write_text(json.dumps(records))
    return path, counts


def plan_batches(lengths: list[int], args) -> dict[str, list[list[int]]]:
    """Each variant's micro-batches over the same samples (indices), as its sampler would give them."""
    order = list(range(len(lengths)))
    random.Random(args.seed).shuffle(order)  # the Trainer's RandomSampler: one seeded shuffle
    b = args.pack_batch_size
    padded = [order[k : k + b] for k in range(0, len(order), b)]
    grouped = list(LengthGroupedBatchSampler(lengths, b, seed=args.seed))
    packed = list(PackedBatchSampler(lengths, args.pack_max_length, rows=args.pack_rows, seed=args.seed))
    return {"llava": padded, "ours-padded": padded, "ours-grouped": grouped, "ours-padding-free": padded,
            "ours-packed": packed}  # fmt: skip


def flash_or_sdpa(device: str) -> str:
    if not device.startswith("cuda"):
        return "sdpa"
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa"


def bench_packing(models: dict, processor, folder: Path, args) -> dict:
    """Time one pass of every variant per repeat (order rotating), with peak memory; returns rows + settings."""
    data_path, counts = make_mix_data(folder, args.pack_samples, args.seed)
    dataset = load_vlm_dataset(str(data_path))
    examples = [dataset[i] for i in range(len(dataset))]
    lengths = cheap_lengths(dataset, processor, args.pack_max_length)
    batches = make_batches(examples, processor, plan_batches(lengths, args), args)
    attn = flash_or_sdpa(args.device)
    before = models[OURS].config.get_text_config()._attn_implementation
    params = prepare_for_stage2(models, attn)
    stats = time_variants(models, batches, params, args)
    for name in (OURS, LLAVA):
        del models[name].forward
        models[name].activation_checkpointing_disable()
        models[name].set_attn_implementation(before)
    rows = [_row(v, batches[v], stats[v], stats["llava"], len(examples)) for v in VARIANTS]
    kinds = json.loads(data_path.read_text())
    by_kind = {k: [lengths[i] for i, rec in enumerate(kinds) if rec["kind"] == k] for k in MIX}
    return {
        "rows": rows,
        "attn_implementation": attn,
        "samples": len(examples),
        "mix": {k: {"share": MIX[k], "count": counts[k], "tokens": [min(v), max(v)]} for k, v in by_kind.items() if v},
        "batch_size": args.pack_batch_size,
        "rows_per_pack_step": args.pack_rows,
        "max_length": args.pack_max_length,
        "repeats": args.pack_repeats,
    }


def make_batches(examples: list[dict], processor, plans: dict, args) -> dict[str, list[dict]]:
    """Every variant's batches, collated up front (padded, or padding-free for the padding-free and packed ones)."""
    padded_c = VLMCollator(processor, max_length=args.pack_max_length)
    free_c = PaddingFreeCollator(processor, max_length=args.pack_max_length)
    collate = {v: free_c if v in ("ours-padding-free", "ours-packed") else padded_c for v in VARIANTS}
    return {
        v: [to_device(collate[v]([examples[i] for i in idx]), args.device, args.dtype) for idx in plans[v]]
        for v in VARIANTS
    }


def prepare_for_stage2(models: dict, attn: str) -> list:
    """Both models set up as the SFT recipes train (frozen tower, activation checkpointing, TRL's fused LM head);
    returns the trainable parameters (shared between the two)."""
    for name in (OURS, LLAVA):
        models[name].set_attn_implementation(attn)
        freeze(models[name], SFT_MODULES)
        models[name].train()
        models[name].activation_checkpointing_enable()  # stage 2 as the SFT recipes run it
    for name in (OURS, LLAVA):
        add_fused_lm_head(models[name], outputs=("log_probs", "entropy", "is_top1"))
    trainable = {id(p): p for m in (models[OURS], models[LLAVA]) for p in m.parameters() if p.requires_grad}
    return list(trainable.values())


def time_variants(models: dict, batches: dict, params: list, args) -> dict:
    """Per variant: the seconds of each repeat's pass over its batches, CPU busy before it, peak memory."""
    model_of = {v: models[LLAVA] if v == "llava" else models[OURS] for v in VARIANTS}
    optimizer = make_optimizer(params)
    smallest = min(batches["llava"], key=lambda x: x["input_ids"].numel())
    for v in ("llava", "ours-padded"):  # untimed warm-up: first-step costs (threads, allocator) on both models
        step(model_of[v], smallest, optimizer, params, args.device)
    probe = MemoryProbe(args.device)
    stats = {v: {"times": [], "busy": [], "peak_mb": 0.0, "step_mb": 0.0} for v in VARIANTS}
    for r in range(args.pack_repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]  # each variant takes each slot in turn
        for v in order:
            stats[v]["busy"].append(args.gate.wait())
            probe.start()
            t = sum(sum(step(model_of[v], b, optimizer, params, args.device)) for b in batches[v])
            peak, grown = probe.stop()
            stats[v]["times"].append(t)
            stats[v]["peak_mb"], stats[v]["step_mb"] = max(stats[v]["peak_mb"], peak), max(stats[v]["step_mb"], grown)
        print("  packing repeat", r + 1, ", ".join(f"{v} {s['times'][-1]:.1f}s" for v, s in stats.items()), flush=True)
    return stats


def _row(variant: str, batches: list[dict], s: dict, llava: dict, n_samples: int) -> dict:
    t = statistics.median(s["times"])
    real = sum(int(b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()) for b in batches)
    processed = sum(b["input_ids"].numel() for b in batches)
    ratio, spread = _paired(s["times"], llava["times"])
    return {
        "variant": variant,
        "steps": len(batches),
        "pass_s": t,
        "pass_s_all": s["times"],
        "samples_per_s": n_samples / t,
        "real_tokens_per_s": real / t,
        "pad_fraction": 1 - real / processed,
        "tokens_per_pass": processed,
        "peak_mb": s["peak_mb"],
        "step_mb": s["step_mb"],
        "speed_vs_llava": ratio,
        "speed_vs_llava_range": spread,
        "cpu_busy_before": s["busy"],
    }
