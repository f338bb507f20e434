"""Bench section `gguf`: llama.cpp (f16, q8_0, q4_k_m) against our transformers fp32 `generate`, with one image.

    HF_HUB_OFFLINE=1 python -m bench --sections gguf --threads 2   # writes bench/results/cpu-gguf.json

Notable:
- The full-size default architecture (config.json: SigLIP-base-224 + Qwen2.5-0.5B) with seeded random weights,
  exported by the real export code (`gguf_export.write_gguf`, in memory): nothing is downloaded. Before anything is
  timed, the f16 file's logits on a text prompt are compared with ours (the export at full size, recorded).
- Each runtime runs in a fresh process of its own (`python -m bench.gguf SPEC`), one after the other, with the same
  thread count: its peak memory is that process's high-water mark (VmHWM: weights, KV cache, activations), and no
  runtime's heap or threads slow another.
- Time to first token: from the chat (a 640x480 image and a question) to the first new token, preprocessing
  included on both sides (our processor; llama.cpp's PNG decode and resize), the median of --gen-repeats after a
  warm-up. Decode tokens/s: 1 / the median gap between two new tokens over --new-tokens tokens, so one token slowed
  by a neighbour process does not count.
- Random weights must not stop early: transformers gets min_new_tokens, and llama.cpp's decode loop is
  `Llama.generate` (eval + greedy sample per token, the loop its completions run), which has no stop condition.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Describe this image."
VARIANTS = {"transformers fp32": None, "llama.cpp f16": "f16", "llama.cpp q8_0": "q8_0", "llama.cpp q4_k_m": "q4_k_m"}
BASE = "transformers fp32"


# ----------------------------------------------------------------------------- the parent: build, export, compare


def build(tmp: Path, seed: int):
    """(model, processor, image path): the full-size architecture, random weights, and a 640x480 test image."""
    from transformers.initialization import no_init_weights

    from bench.models import build_processor, make_data, random_init
    from configuration_qwen_siglip import QwenSiglipConfig
    from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
    from processing_qwen_siglip import IMAGE_TOKEN
    from qwen_siglip.tiny import DEFAULT_CORPUS, build_tokenizer

    _, texts = make_data(tmp, 1, 32, seed)
    tokenizer = build_tokenizer([*DEFAULT_CORPUS, *texts], vocab_size=1024)
    config = QwenSiglipConfig.from_pretrained(ROOT, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    with no_init_weights():
        model = QwenSiglipForConditionalGeneration(config)
    random_init(model, seed, config.text_config.initializer_range)
    model.tie_weights()
    # The tokenizer's own end and pad ids (config.json's are the real Qwen vocabulary's), as `compose` sets them.
    end, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config.update(eos_token_id=[end, pad], pad_token_id=pad, suppress_tokens=[config.image_token_id])
    from PIL import Image

    image = tmp / "image.png"
    Image.open(tmp / "00000.jpg").convert("RGB").save(image)  # PNG: both runtimes decode the very same pixels
    return model.eval(), build_processor(tokenizer, config.num_image_tokens), image


def bench_gguf(args, tmp: Path) -> dict:
    """Every variant's time to first token, decode speed, peak memory and file size; ratios against transformers."""
    from qwen_siglip.gguf_export import write_gguf

    model, processor, image = build(tmp, args.seed)
    checkpoint = tmp / "checkpoint"
    model.save_pretrained(checkpoint)  # the transformers worker loads it, as a user would
    processor.save_pretrained(checkpoint)
    t = time.perf_counter()
    files = write_gguf(model, processor, tmp / "gguf", [v for v in VARIANTS.values() if v], "qwen-siglip")
    export_s = time.perf_counter() - t
    print(f"  gguf: exported {', '.join(p.name for p in files.values())} in {export_s:.0f}s", flush=True)
    check = export_check(model, processor, files, tmp)
    del model  # the workers load their own copies
    common = {"image": str(image), "question": QUESTION, "new_tokens": args.new_tokens, "repeats": args.gen_repeats,
              "threads": args.threads or os.cpu_count(), "quiet_wait": args.quiet_wait}  # fmt: skip
    rows = []
    for name, outtype in VARIANTS.items():
        spec = {**common, "runtime": "transformers", "model": str(checkpoint)}
        if outtype:
            spec |= {"runtime": "llama", "model": str(files[outtype]), "mmproj": str(files["mmproj"])}
        result = run_worker(spec, tmp / f"{outtype or 'transformers'}.json")
        size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) if not outtype else (
            files[outtype].stat().st_size + files["mmproj"].stat().st_size)  # fmt: skip
        rows.append({"variant": name, "file_mb": size / 2**20, **result})
        print(f"  gguf: {name}: first token {result['ttft_s']:.2f}s, {result['decode_tokens_per_s']:.3g} tok/s, "
              f"peak {result['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    if len({row["prompt_tokens"] for row in rows}) != 1:  # the same chat must be the same sequence everywhere
        raise RuntimeError(f"the runtimes saw different prompts: {[(r['variant'], r['prompt_tokens']) for r in rows]}")
    base = rows[0]
    for row in rows:
        row["ttft_speedup"] = base["ttft_s"] / row["ttft_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    import llama_cpp

    return {"rows": rows, "export_s": export_s, "f16_check": check, "threads": common["threads"],
            "prompt_tokens": result["prompt_tokens"], "new_tokens": args.new_tokens,
            "llama_cpp_python": llama_cpp.__version__}  # fmt: skip


def export_check(model, processor, files: dict, tmp: Path) -> dict:
    """Max |logits difference| of the f16 file against ours on a text prompt, relative to the logits' range;
    refuses to time a file that does not compute our model."""
    import numpy as np
    import torch

    chat = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    ids = processor.tokenizer(processor.apply_chat_template(chat, add_generation_prompt=True))["input_ids"]
    out = tmp / "f16-logits.npy"
    run_worker({"runtime": "logits", "model": str(files["f16"]), "ids": ids, "out": str(out)}, tmp / "logits.json")
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    theirs = np.load(out)
    diff, scale = float(np.abs(theirs - ours).max()), float(np.abs(ours).max())
    same_top1 = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    if diff > 1e-2 * scale:
        raise RuntimeError(f"the f16 GGUF disagrees with our model (max |logits diff| {diff:.3g} of {scale:.3g})")
    return {"max_abs_diff": diff, "logits_range": scale, "same_top1": same_top1, "tokens": len(ids)}


def run_worker(spec: dict, result_path: Path) -> dict:
    """`python -m bench.gguf SPEC` in a fresh process; its result, or its output's tail if it failed."""
    spec_path = result_path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "bench.gguf", str(spec_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3600)  # fmt: skip
    if run.returncode:
        raise RuntimeError(f"bench.gguf worker ({spec['runtime']}) failed:\n{(run.stdout + run.stderr)[-3000:]}")
    return json.loads(result_path.read_text())


# ----------------------------------------------------------------------------- the workers: one runtime each


def peak_rss_mb() -> float:
    from bench.machine import _status_bytes

    return _status_bytes("VmHWM") / 2**20


def measure(once, repeats: int, quiet_wait: float) -> dict:
    """Warm up once, then `repeats` timed runs of `once()` -> (ttft, token stamps), each after the quiet-CPU gate."""
    from bench.machine import QuietGate

    gate = QuietGate(quiet_wait, 10 * quiet_wait)
    once()
    ttft, decode, busy = [], [], []
    for _ in range(repeats):
        busy.append(gate.wait())
        first, stamps = once()
        ttft.append(first)
        decode.append(1 / statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
    return {"ttft_s": statistics.median(ttft), "ttft_s_all": ttft, "decode_tokens_per_s": statistics.median(decode),
            "decode_tokens_per_s_all": decode, "cpu_busy_before": busy}  # fmt: skip


def transformers_worker(spec: dict) -> dict:
    import torch
    from PIL import Image
    from transformers import GenerationConfig

    from bench.generation import TokenClock
    from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
    from processing_qwen_siglip import QwenSiglipProcessor

    torch.set_num_threads(spec["threads"])
    model = QwenSiglipForConditionalGeneration.from_pretrained(spec["model"], dtype=torch.float32).eval()
    processor = QwenSiglipProcessor.from_pretrained(spec["model"])
    image = Image.open(spec["image"]).convert("RGB")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec["question"]}]}]
    n = spec["new_tokens"]
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                              eos_token_id=model.generation_config.eos_token_id,
                              pad_token_id=model.generation_config.pad_token_id)  # fmt: skip

    def once():
        clock, start = TokenClock("cpu"), time.perf_counter()
        inputs = processor(images=[image], text=processor.apply_chat_template(chat, add_generation_prompt=True),
                           return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            model.generate(**inputs, generation_config=config, stopping_criteria=[clock])
        once.prompt_tokens = inputs["input_ids"].shape[1]
        return clock.stamps[0] - start, clock.stamps

    result = measure(once, spec["repeats"], spec["quiet_wait"])
    return {**result, "prompt_tokens": once.prompt_tokens, "peak_rss_mb": peak_rss_mb()}


def llama_worker(spec: dict) -> dict:
    import base64

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    handler = MTMDChatHandler(clip_model_path=spec["mmproj"], verbose=False, use_gpu=False)
    llm = Llama(spec["model"], chat_handler=handler, n_ctx=1024, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)  # fmt: skip
    url = "data:image/png;base64," + base64.b64encode(Path(spec["image"]).read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": url}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": spec["question"]}]}]

    def once():
        start = time.perf_counter()
        llm.create_chat_completion(messages, max_tokens=1, temperature=0.0)  # template, image, prefill, 1 token
        first = time.perf_counter() - start
        once.prompt_tokens, stamps = llm.n_tokens, []
        tokens = llm.generate(llm.input_ids[: llm.n_tokens].tolist(), temp=0.0)  # on from the evaluated prompt
        for _ in range(spec["new_tokens"]):
            next(tokens)
            stamps.append(time.perf_counter())
        return first, stamps

    result = measure(once, spec["repeats"], spec["quiet_wait"])
    out = {**result, "prompt_tokens": once.prompt_tokens, "peak_rss_mb": peak_rss_mb()}
    llm.close()
    return out


def logits_worker(spec: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(spec["model"], n_ctx=256, logits_all=True, verbose=False)
    llm.eval(spec["ids"])
    np.save(spec["out"], np.array(llm.scores[: len(spec["ids"])]))
    llm.close()
    return {}


if __name__ == "__main__":
    worker_spec = json.loads(Path(sys.argv[1]).read_text())
    workers = {"transformers": transformers_worker, "llama": llama_worker, "logits": logits_worker}
    Path(worker_spec["result"]).write_text(json.dumps(workers[worker_spec["runtime"]](worker_spec)))
