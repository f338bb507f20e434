"""Benchmark: QwenSiglip vs transformers' LLaVA with the very same weights: training, generation, data, packing.

    HF_HUB_OFFLINE=1 python -m bench              # CPU: fp32, batch 2
    HF_HUB_OFFLINE=1 python -m bench --threads 1  # a 2-core machine shared with others: bench/results/cpu.json
    HF_HUB_OFFLINE=1 python -m bench --sections packing   # packing alone: results/cpu-packing.json
    HF_HUB_OFFLINE=1 python -m bench --quick      # smoke run: 1 repeat, batch 1, generation batch 1
    HF_HUB_OFFLINE=1 python -m bench --sections gguf --threads 2  # llama.cpp vs ours: results/cpu-gguf.json
    python -m bench --device cuda                 # GPU: bf16, batch 16, 64 new tokens, flash attention
    Flags for more: --batch-size, --repeats, --gen-repeats, --gen-batch-sizes, --new-tokens, --text-tokens, --workers,
    --gradient-checkpointing recipe|off|on, --sections train,generate,data,packing, --quiet-wait, --pack-*.

Prints markdown tables (the README's Performance section) and writes bench/results/<device>.json.

All on the full-size architecture of config.json (SigLIP-base-224 + Qwen2.5-0.5B) with random weights, in one
process, the models interleaved on every repeat; medians over repeats, and ratios as the median of per-repeat paired
ratios (so a neighbour slowing one stretch of the run hits both sides of a pair). One module per section:
- machine.py: machine facts, the matmul ceiling (MFU's denominator), the quiet-CPU gate, peak memory;
- models.py: the data, the processor, the three models (ours, LLaVA with the same Parameters, ours-ps2);
- train_step.py: SFTTrainer's training step, stages 1 and 2;
- generation.py: greedy decoding with the KV cache;
- data_pipeline.py: the data module + collator against the training step;
- bench_packing.py: stage 2 on a length mix: padded, grouped by length, padding-free, packed;
- gguf.py: llama.cpp on the GGUF export (f16, q8_0, q4_k_m) against our generate (not in the default sections);
- report.py: the issue's targets and the tables.
Tokenizer: tiny.build_tokenizer trained on the benchmark's texts (the Qwen2.5 tokenizer is not downloadable). Its
<|image_pad|> id is small, so `image_token_id` is set to it in the config, as `compose` does for any
tokenizer; ids change no cost. Token counts are the collator's own (tokens/s: all non-padding tokens).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from bench.bench_packing import bench_packing  # noqa: E402
from bench.data_pipeline import bench_data  # noqa: E402
from bench.generation import bench_generation  # noqa: E402
from bench.gguf import bench_gguf  # noqa: E402
from bench.machine import MemoryProbe, QuietGate, machine_info, peak_matmul_flops  # noqa: E402
from bench.models import (  # noqa: E402
    LLAVA,
    OURS,
    OURS_PS2,
    build_models,
    build_processor,
    check_same_logits,
    make_data,
    to_device,
)
from bench.report import table, targets  # noqa: E402
from bench.train_step import bench_training  # noqa: E402
from configuration_qwen_siglip import QwenSiglipConfig  # noqa: E402
from processing_qwen_siglip import IMAGE_TOKEN  # noqa: E402
from qwen_siglip.collator import VLMCollator  # noqa: E402
from qwen_siglip.data import load_vlm_dataset  # noqa: E402
from qwen_siglip.tiny import DEFAULT_CORPUS, build_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16; default fp32 on CPU, bf16 on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="training batch; default 2 on CPU, 16 on GPU")
    p.add_argument("--gen-batch-sizes", default="1,8", help="comma-separated generation batch sizes")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens per sample besides image tokens")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt; 16 on CPU, 64 on GPU")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per model and stage, after a warm-up")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed generations per model; default 3")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="max seconds to wait for a quiet CPU before each measurement (10x in all); default 0 (never)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        choices=["recipe", "off", "on"],
        default="recipe",
        help="activation checkpointing: recipe = stage 2 only, as train_sft.py and the SFT recipes",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default all cores")
    p.add_argument("--workers", default="0,4", help="DataLoader worker counts to measure")
    p.add_argument("--sections", default="train,generate,data,packing", help="of train,generate,data,packing,gguf")
    p.add_argument("--pack-samples", type=int, default=None, help="packing: samples in the mix; 10 CPU, 256 GPU")
    p.add_argument("--pack-batch-size", type=int, default=None, help="packing: padded batch; default 4 CPU, 16 GPU")
    p.add_argument("--pack-rows", type=int, default=None, help="packing: rows of max length a step; 1 CPU, 4 GPU")
    p.add_argument("--pack-max-length", type=int, default=2048, help="packing: max_length, a pack's size (recipes')")
    p.add_argument("--pack-repeats", type=int, default=None, help="packing: passes per variant; 1 CPU, 3 GPU")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, batch 1, generation batch 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path; default bench/results/<device>.json")
    return settle(p.parse_args(argv))


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on the device and on --quick; lists parsed; the quiet-CPU gate; the results path."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    if args.quick:
        args.repeats, args.gen_repeats, args.gen_batch_sizes, args.workers = 1, 1, "1", "0"
        args.batch_size, args.new_tokens = args.batch_size or 1, args.new_tokens or 8
        args.pack_samples, args.pack_batch_size = args.pack_samples or 4, args.pack_batch_size or 2
    args.batch_size = args.batch_size or (16 if gpu else 2)
    args.new_tokens = args.new_tokens or (64 if gpu else 16)
    args.pack_samples = args.pack_samples or (256 if gpu else 10)
    args.pack_batch_size = args.pack_batch_size or (16 if gpu else 4)
    args.pack_rows = args.pack_rows or (4 if gpu else 1)
    args.pack_repeats = args.pack_repeats or (3 if gpu else 1)
    args.gen_repeats = args.gen_repeats or min(3, args.repeats)
    args.quiet_wait = args.quiet_wait or 0.0
    args.gate = QuietGate(args.quiet_wait, 10 * args.quiet_wait, enabled=not gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.gen_batch_sizes = [int(b) for b in args.gen_batch_sizes.split(",") if b]
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.sections = set(args.sections.split(","))
    # A run of some sections only gets its own file: it must not overwrite a full run's results.
    suffix = "" if args.sections >= {"train", "generate", "data", "packing"} else "-" + "-".join(sorted(args.sections))
    args.out = Path(args.out or ROOT / "bench" / "results" / f"{args.device.split(':')[0]}{suffix}.json")
    return args


# ----------------------------------------------------------------------------- machine


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    results = {
        "machine": machine_info(args.device),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "sections", "dtype", "quick", "gate")},
            "dtype": str(args.dtype).removeprefix("torch."),
            "memory_method": MemoryProbe(args.device).method,
        },
    }
    results["load_average"] = {"start": os.getloadavg()}
    args.gate.wait()
    first_peak = peak_matmul_flops(args.device, args.dtype)
    print(f"peak matmul: {first_peak['flops_per_s'] / 1e9:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        run_sections(args, results, Path(tmp))
    finish(args, results, first_peak)
    results["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    print(f"\nwrote {args.out} ({results['wall_s']:.0f}s)")
    return results


def run_sections(args: argparse.Namespace, results: dict, tmp: Path) -> None:
    """Build the data and the models compared, check they agree, then time each section asked for."""
    if "gguf" in args.sections:  # its own model, files and processes (bench/gguf.py)
        results["gguf"] = bench_gguf(args, tmp)
        if args.sections == {"gguf"}:
            return
    n_data = max(64, args.batch_size * 8, max(args.gen_batch_sizes))
    data_path, texts = make_data(tmp, n_data, args.text_tokens, args.seed)
    tokenizer = build_tokenizer([*DEFAULT_CORPUS, *texts], vocab_size=1024)
    config = QwenSiglipConfig.from_pretrained(ROOT, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    dataset = load_vlm_dataset(str(data_path))
    examples = [dataset[i] for i in range(max(args.batch_size, max(args.gen_batch_sizes)))]
    t = time.perf_counter()
    models = build_models(config, args)
    print(f"models built in {time.perf_counter() - t:.1f}s")
    processors = {OURS: build_processor(tokenizer, 196), LLAVA: build_processor(tokenizer, 196)}
    processors[OURS_PS2] = build_processor(tokenizer, models[OURS_PS2].config.num_image_tokens)
    collators = {n: VLMCollator(p, max_length=2048) for n, p in processors.items()}
    batches = {n: to_device(c(examples[: args.batch_size]), args.device, args.dtype) for n, c in collators.items()}
    results["logits_max_abs_diff"] = check_same_logits(models[OURS], models[LLAVA], batches[OURS], args.dtype)
    print(f"ours vs LLaVA logits: max |diff| {results['logits_max_abs_diff']:.2g}")
    if "train" in args.sections:
        results["training"] = bench_training(models, batches, args)
    if "generate" in args.sections:
        results["generation"] = bench_generation(models, processors, examples, tokenizer, args)
    if "data" in args.sections:
        results["data"] = []
        for workers in args.workers:
            args.gate.wait()
            results["data"].append(bench_data(dataset, collators[OURS], args.batch_size, workers))
    if "packing" in args.sections:
        results["packing"] = bench_packing(models, processors[OURS], tmp, args)


def finish(args: argparse.Namespace, results: dict, first_peak: dict) -> None:
    """The matmul ceiling (MFU's denominator), the machine's load, and the targets."""
    # The ceiling is the better of two timings, first and last: one taken while a neighbour ran would understate it.
    args.gate.wait()
    last_peak = peak_matmul_flops(args.device, args.dtype)
    results["peak_matmul"] = max(first_peak, last_peak, key=lambda p: p["flops_per_s"])
    results["peak_matmul"]["flops_per_s_both"] = [first_peak["flops_per_s"], last_peak["flops_per_s"]]
    for row in results.get("training", []):
        row["mfu"] = row["flops_per_s"] / results["peak_matmul"]["flops_per_s"]
    results["load_average"]["end"] = os.getloadavg()
    results["quiet_gate"] = {"waited_s": args.gate.waited, "measurements_started_busy": args.gate.busy_starts}
    results["targets"] = targets(results)


if __name__ == "__main__":
    main()
