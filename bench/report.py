"""The report: the issue's targets (met, missed, or missed within the noise) and the README's markdown tables."""

from bench.models import LLAVA, OURS, OURS_PS2
from bench.train_step import CHECKPOINTING, STAGES


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured ratio and whether it holds (or misses only within the noise)."""
    out = []
    train = {(r["stage"], r["model"]): r for r in results.get("training", [])}
    for stage in STAGES:
        if (stage, OURS) not in train:
            continue
        ours, llava, ps2 = train[stage, OURS], train[stage, LLAVA], train[stage, OURS_PS2]
        kept = {n: r["saved_mb"] + r["grad_mb"] for n, r in ((OURS, ours), (LLAVA, llava))}
        mem = llava["step_mb"] / ours["step_mb"]
        out += [
            _target(
                f"stage {stage}: tokens/s, 196 image tokens", ours["speed_vs_llava"], 1.0, ours["speed_vs_llava_range"]
            ),
            # With compression the same samples hold fewer LM tokens (174 vs 468 a batch here), so the speed-up
            # is in samples (images + text) per second; LM tokens/s stays about flat by design (table column).
            _target(
                f"stage {stage}: samples/s, pixel shuffle 2", ps2["speed_vs_llava"], 2.0, ps2["speed_vs_llava_range"]
            ),
            _target(f"stage {stage}: same, fwd+bwd only", ps2["forward_backward_speed_vs_llava"], 2.0),
            # Resident memory moves by a few % from run to run; what autograd keeps is exact.
            _target(f"stage {stage}: step memory, LLaVA's / ours", mem, 1.0, [mem, mem * 1.05]),
            _target(f"stage {stage}: saved activations + grads, LLaVA's / ours", kept[LLAVA] / kept[OURS], 1.0),
        ]
    for row in results.get("generation", []):
        if row["model"] == OURS:
            decode, spread = row["decode_vs_llava"], row["decode_vs_llava_range"]
            out.append(_target(f"decode tokens/s, batch {row['batch']}", decode, 1.0, spread))
    if train and results.get("data"):
        fastest = max(r["samples_per_s"] for r in train.values())
        for row in results["data"]:
            ratio = row["samples_per_s"] / fastest
            out.append(_target(f"data samples/s / fastest training step, {row['workers']} workers", ratio, 5.0))
    for row in results.get("gguf", {}).get("rows", []):
        if row["variant"] == "llama.cpp q8_0":  # the goals for the GGUF export
            out.append(_target("llama.cpp q8_0: decode tokens/s vs transformers fp32", row["decode_speedup"], 3.0))
            out.append(_target("llama.cpp q8_0: time to first token vs transformers fp32", row["ttft_speedup"], 2.0))
    pack = {r["variant"]: r for r in results.get("packing", {}).get("rows", [])}
    for variant, label in (("ours-padding-free", "padding-free"), ("ours-packed", "packed")):
        if variant in pack:
            row = pack[variant]
            name = f"stage 2: samples/s, {label}, length mix"
            out.append(_target(name, row["speed_vs_llava"], 1.5, row["speed_vs_llava_range"]))
    return out


def _target(name: str, value: float, goal: float, spread: list[float] | None = None) -> dict:
    """`met`: the (median) ratio reaches the goal. `within_noise`: it does not, but the goal lies inside the spread
    seen over the repeats (or, for resident memory, inside its run-to-run swing)."""
    noise = value < goal and spread is not None and spread[1] >= goal
    return {"target": name, "value": value, "goal": goal, "met": value >= goal, "within_noise": noise}


def table(results: dict) -> str:
    """Every section's markdown table (the README's Performance section), the machine first."""
    lines = [machine_line(results), ""]
    if results.get("training"):
        lines += training_table(results["training"], results["settings"]) + [""]
    if results.get("generation"):
        lines += generation_table(results["generation"], results["settings"]) + [""]
    if results.get("data"):
        lines += [f"Data pipeline (JPEG decode, resize, tokenize, pad), batch {results['settings']['batch_size']}", ""]
        lines += ["| workers | samples/s |", "|---|---|"]
        lines += [f"| {r['workers']} | {r['samples_per_s']:.3g} |" for r in results["data"]] + [""]
    if results.get("packing"):
        lines += packing_table(results["packing"]) + [""]
    if results.get("gguf"):
        lines += gguf_table(results["gguf"], results["settings"]) + [""]
    if results.get("targets"):
        lines += ["| target | measured | goal | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            met = "yes" if t["met"] else ("no (within noise)" if t["within_noise"] else "no")
            lines.append(f"| {t['target']} | {t['value']:.2f}x | {t['goal']:g}x | {met} |")
    return "\n".join(lines)


def machine_line(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    diff = results.get("logits_max_abs_diff")  # absent when only the gguf section ran (no LLaVA twin built)
    return (
        f"Machine: {m.get('gpu') or m['cpu']} ({m['cpu_cores']} CPU cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}; {s['dtype']}; peak matmul "
        f"{results['peak_matmul']['flops_per_s'] / 1e9:.0f} GFLOP/s; "
        + (f"ours vs LLaVA logits max |diff| {diff:.2g}; " if diff is not None else "")
        + f"load average {results['load_average']['start'][0]:.1f} at start, "
        f"{results['load_average']['end'][0]:.1f} at end; {results['quiet_gate']['measurements_started_busy']} "
        f"measurements started while another process kept the CPU busy."
    )


def training_table(rows: list[dict], s: dict) -> list[str]:
    lines = [
        f"Training step, batch {s['batch_size']} (SFTTrainer's: fused LM head, fwd+bwd, clip, fused AdamW; "
        f"activation checkpointing: {CHECKPOINTING[s['gradient_checkpointing']]}); "
        f"median of {s['repeats']}, vs LLaVA = paired samples/s ratio (range over repeats)",
        "",
        "| stage | model | img tok | tok/batch | samples/s | tokens/s | vs LLaVA | optim s | MFU | GFLOP | "
        "aten ops | step MB | saved MB | grad MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["speed_vs_llava_range"]
        lines.append(
            f"| {r['stage']} | {r['model']} | {r['image_tokens']} | {r['tokens_per_batch']} | "
            f"{r['samples_per_s']:.3g} | {r['tokens_per_s']:.3g} | "
            f"{r['speed_vs_llava']:.2f}x ({lo:.2f}-{hi:.2f}) | "
            f"{r['optimizer_s']:.2f} | {r['mfu']:.0%} | {r['flops_per_step'] / 1e9:.0f} | "
            f"{r['aten_ops_per_step']} | {r['step_mb']:.0f} | {r['saved_mb']:.0f} | {r['grad_mb']:.0f} |"
        )
    return lines


def generation_table(rows: list[dict], s: dict) -> list[str]:
    lines = [
        f"Generation: greedy, KV cache, {s['new_tokens']} new tokens; median of {s['gen_repeats']}",
        "",
        "| batch | model | prompt tok | first token s | vs LLaVA | decode tok/s | vs LLaVA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["decode_vs_llava_range"]
        lines.append(
            f"| {r['batch']} | {r['model']} | {r['prompt_tokens']} | {r['ttft_s']:.3g} | "
            f"{r['ttft_speed_vs_llava']:.2f}x | {r['decode_tokens_per_s']:.3g} | "
            f"{r['decode_vs_llava']:.2f}x ({lo:.2f}-{hi:.2f}) |"
        )
    return lines


def packing_table(p: dict) -> list[str]:
    mix = "; ".join(f"{k.replace('_', ' ')} {v['share']:.0%} ({v['tokens'][0]}-{v['tokens'][1]} tokens)"
                    for k, v in p["mix"].items())  # fmt: skip
    lines = [
        f"Stage 2 on a length mix ({p['samples']} samples: {mix}; image tokens included), one pass per variant, "
        f"padded batch {p['batch_size']}, packs of {p['max_length']} x {p['rows_per_pack_step']} a step, "
        f"attention {p['attn_implementation']}; median of {p['repeats']}, vs LLaVA = paired samples/s ratio",
        "",
        "| variant | steps | samples/s | real tokens/s | pad fraction | peak MB | step MB | vs LLaVA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        lo, hi = r["speed_vs_llava_range"]
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['samples_per_s']:.3g} | {r['real_tokens_per_s']:.3g} | "
            f"{r['pad_fraction']:.0%} | {r['peak_mb']:.0f} | {r['step_mb']:.0f} | "
            f"{r['speed_vs_llava']:.2f}x ({lo:.2f}-{hi:.2f}) |"
        )
    return lines


def gguf_table(g: dict, s: dict) -> list[str]:
    c = g["f16_check"]
    starts = [b for r in g["rows"] for b in r.get("cpu_busy_before", [])]
    busy = sum(b > 0.3 for b in starts)  # QuietGate's threshold
    lines = [
        f"GGUF export in llama.cpp (llama-cpp-python, stock MTMDChatHandler) vs our transformers fp32 `generate`: one "
        f"640x480 image + question ({g['prompt_tokens']} prompt tokens), greedy, {g['new_tokens']} new tokens, "
        f"{g['threads']} threads each, each runtime in a fresh process, one after the other; median of "
        f"{s['gen_repeats']} after a warm-up; {busy} of {len(starts)} timed runs started while other processes kept "
        f"the CPU busy. f16 file vs ours, text logits: max |diff| {c['max_abs_diff']:.3g} (logits range "
        f"{c['logits_range']:.3g}), same top-1 at {c['same_top1']:.0%} of {c['tokens']} positions",
        "",
        "| runtime | files MB | first token s | vs transformers | decode tok/s | vs transformers | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in g["rows"]:
        lines.append(
            f"| {r['variant']} | {r['file_mb']:.0f} | {r['ttft_s']:.2f} | {r['ttft_speedup']:.2f}x | "
            f"{r['decode_tokens_per_s']:.3g} | {r['decode_speedup']:.2f}x | {r['peak_rss_mb']:.0f} |"
        )
    return lines
