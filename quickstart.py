"""The embedded default: the whole two-stage pipeline on synthetic data, with no downloads, in a few CPU minutes.

    python quickstart.py                # or: make quickstart

1. draws a synthetic image set (coloured shapes; stage-1 captions, stage-2 questions in English and Chinese about
   colour, shape, position and count, and a held-out split of unseen images);
2. saves tiny random SigLIP and Qwen2 bases (with a tokenizer trained on the set's text) like Hub checkpoints;
3. runs `train_pretrain.py` then `train_sft.py` with `recipes/quickstart_*.yaml`: the same code paths as a real run;
4. loads the result with `AutoModelForCausalLM`/`AutoProcessor` and prints held-out exact-match accuracy next to the
   blind baseline (the same model answering with blank images) and chance, then the share of held-out captions with
   every colour, shape, position and count word right (`synthetic.caption_correct`), blind baseline beside it.
"""

import argparse
import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from qwen_siglip import synthetic
from qwen_siglip.tiny import save_tiny_bases

ROOT = Path(__file__).resolve().parent


# The tiny bases: 128 wide (64 is too narrow to tie each colour and shape to its cell in stage 1), with random weights
# of std ~1/sqrt(width) instead of Qwen's 0.02 (see tiny.py).
BASES = dict(hidden=128, layers=2, heads=4, initializer_range=0.08)
STEP = re.compile(r"step (\d+)/(\d+) loss ([\d.]+)")  # trainer.ProgressLog's line


def stage(title: str, script: str, recipe: str, log: Path, *args: str) -> None:
    """Run one training stage exactly as a user would, in its own process. Its whole output goes to `log`; the
    terminal shows one progress line (and the log's tail if the stage fails)."""
    cmd = [sys.executable, str(ROOT / script), "--config", str(ROOT / "recipes" / recipe), "--disable_tqdm", "true"]
    with (
        open(log, "w") as f,
        subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        for line in proc.stdout:
            f.write(line)
            if m := STEP.search(line):
                print(f"\r  {title}: step {m[1]}/{m[2]}, loss {float(m[3]):.3f}", end="", flush=True)
    print()
    if proc.returncode:
        print("".join(log.read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
        raise SystemExit(f"{script} failed (exit {proc.returncode}); its whole output: {log}")


@contextlib.contextmanager
def quiet(log: Path):
    """Progress bars and loading messages of an in-process step go to `log`, not to the terminal."""
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/quickstart")
    parser.add_argument("--n-pretrain", type=int, default=20000)
    parser.add_argument("--n-sft", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--sft-epochs", type=float, default=None, help="override the recipe's epochs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(args: argparse.Namespace, out: Path, data: dict[str, Path], vision: Path, text: Path) -> Path:
    """Both stages through the real scripts; returns the stage-2 folder."""
    common = ["--seed", str(args.seed)]
    stage("stage 1 (align)", "train_pretrain.py", "quickstart_pretrain.yaml", out / "pretrain.log",
          "--vision_model", str(vision), "--text_model", str(text), "--dataset_name", str(data["pretrain"]),
          "--output_dir", str(out / "pretrain"), *common)  # fmt: skip
    sft_args = ["--num_train_epochs", str(args.sft_epochs)] if args.sft_epochs else []
    stage("stage 2 (instructions)", "train_sft.py", "quickstart_sft.yaml", out / "sft.log",
          "--model_name_or_path", str(out / "pretrain"), "--dataset_name", str(data["sft_train"]),
          "--output_dir", str(out / "sft"), *common, *sft_args)  # fmt: skip
    return out / "sft"


def evaluate(checkpoint: Path, data: dict[str, Path], log: Path) -> dict:
    """Held-out questions and captions through `evaluate_vlm.py`, as a user would run it."""
    import evaluate_vlm

    print("  evaluating on held-out images", flush=True)
    common = ["--model", str(checkpoint), "--batch_size", "64"]
    with quiet(log):
        questions = evaluate_vlm.main([*common, "--dataset", str(data["sft_test"]), "--max_new_tokens", "8"])
        captions = evaluate_vlm.main([*common, "--dataset", str(data["caption_test"]), "--max_new_tokens", "48",
                                      "--scorer", "qwen_siglip.synthetic:caption_correct",
                                      "--output_dir", str(checkpoint / "eval" / "captions")])  # fmt: skip
    summary, captions = questions["summary"], captions["summary"]
    summary |= {"chance": synthetic.chance_accuracy(data["sft_test"]), "captions": captions["examples"]}
    summary |= {k: captions[k] for k in ("caption_correct", "blind_caption_correct")}
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out, t0 = Path(args.out), time.time()
    data = synthetic.make_shapes_dataset(
        out / "data", n_pretrain=args.n_pretrain, n_sft=args.n_sft, n_test=args.n_test,
        n_caption_test=max(1, args.n_test // 4), seed=args.seed,
    )  # fmt: skip
    texts = synthetic.corpus_texts(data.values())
    with quiet(out / "bases.log"):
        vision, text = save_tiny_bases(out / "bases", texts, image_size=synthetic.IMAGE_SIZE, seed=args.seed, **BASES)
    print(f"synthetic shapes data and tiny random bases in {out} ({time.time() - t0:.0f} s); logs: {out}/*.log")
    checkpoint = train(args, out, data, vision, text)
    summary = {**evaluate(checkpoint, data, out / "evaluate.log"), "seconds": time.time() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"held-out exact match {summary['exact_match']:.1%} | blind baseline {summary['blind_exact_match']:.1%} | "
        f"chance {summary['chance']:.1%} | {summary['examples']} questions | {summary['seconds']:.0f} s\n"
        f"held-out captions all right {summary['caption_correct']:.1%} | blind baseline "
        f"{summary['blind_caption_correct']:.1%} | {summary['captions']} captions (every colour, shape, position and "
        "count word, English and Chinese)\n"
        f"checkpoint: {checkpoint} (loads with AutoModelForCausalLM/AutoProcessor, trust_remote_code=True)"
    )
    return summary


if __name__ == "__main__":
    main()
