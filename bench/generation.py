"""The generation benchmark: greedy, KV cache on, exactly --new-tokens tokens; time to first token and decode speed.

Notable:
- min_new_tokens = max_new_tokens: random weights must not stop early at an end-of-turn token.
- Decode tokens/s = batch / the median gap between two new tokens (a stopping criterion timestamps each), so one
  token slowed by a neighbour process does not count.
"""

import statistics
import time

import torch
from transformers import GenerationConfig, StoppingCriteria

from bench.machine import sync
from bench.models import LLAVA, OURS, QUESTION, to_device
from bench.train_step import _paired, running_orders


class TokenClock(StoppingCriteria):
    """Never stops generation; notes when each new token exists (generate calls it once per token)."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def prompts(processor, examples: list[dict], batch_size: int, device: str, dtype: torch.dtype) -> dict:
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    images = [examples[i % len(examples)]["images"][0] for i in range(batch_size)]
    inputs = processor(images=images, text=[text] * batch_size, padding=True, padding_side="left", return_tensors="pt")
    return to_device(dict(inputs), device, dtype)


def timed_generate(model, inputs: dict, config: GenerationConfig, device: str) -> tuple[float, float]:
    """(seconds to the first new token, decode tokens/s: batch / median time between two new tokens)."""
    clock = TokenClock(device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, generation_config=config, stopping_criteria=[clock])
    # The median interval, not (last - first) / n: one token slowed by a neighbour process does not count.
    interval = statistics.median(b - a for a, b in zip(clock.stamps, clock.stamps[1:]))
    return clock.stamps[0] - start, inputs["input_ids"].shape[0] / interval


def bench_generation(models: dict, processors: dict, examples: list, tokenizer, args) -> list[dict]:
    def fixed_length(n: int) -> GenerationConfig:
        # min = max: random weights must not stop early at an end-of-turn token
        return GenerationConfig(
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

    config = fixed_length(args.new_tokens)
    for name, model in models.items():  # warm-up, batch 1
        model.eval()
        inputs = prompts(processors[name], examples, 1, args.device, args.dtype)
        timed_generate(model, inputs, fixed_length(2), args.device)
    rows = []
    for b in args.gen_batch_sizes:
        inputs = {n: prompts(processors[n], examples, b, args.device, args.dtype) for n in models}
        timed_generate(models[OURS], inputs[OURS], fixed_length(2), args.device)  # grow the heap to this batch
        stats = {n: {"ttft": [], "decode": [], "busy": []} for n in models}
        for r, order in running_orders(list(models), args.gen_repeats):
            for name in order:
                stats[name]["busy"].append(args.gate.wait())
                ttft, decode = timed_generate(models[name], inputs[name], config, args.device)
                stats[name]["ttft"].append(ttft)
                stats[name]["decode"].append(decode)
            took = ", ".join(f"{n} {s['ttft'][-1]:.2f}s + {s['decode'][-1]:.3g} tok/s" for n, s in stats.items())
            print(f"  generate batch {b} repeat {r + 1}: {took}", flush=True)
        base = stats[LLAVA]
        for name, s in stats.items():
            decode_ratio, decode_range = _paired([1 / d for d in s["decode"]], [1 / d for d in base["decode"]])
            rows.append(
                {
                    "model": name,
                    "batch": b,
                    "prompt_tokens": int(inputs[name]["attention_mask"][0].sum()),
                    "new_tokens": args.new_tokens,
                    "ttft_s": statistics.median(s["ttft"]),
                    "ttft_s_all": s["ttft"],
                    "ttft_speed_vs_llava": _paired(s["ttft"], base["ttft"])[0],
                    "decode_tokens_per_s": statistics.median(s["decode"]),
                    "decode_tokens_per_s_all": s["decode"],
                    "decode_vs_llava": decode_ratio,
                    "decode_vs_llava_range": decode_range,
                    "cpu_busy_before": s["busy"],
                }
            )
    return rows
