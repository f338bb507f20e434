"""The embedded default: the whole two-stage pipeline on synthetic data, with no downloads, in a few CPU minutes.

    python quickstart.py                # or: make quickstart
    python quickstart.py --seeds 0 1 2  # one run per seed, then a table of the held-out scores over seeds

1. draws a synthetic image set (coloured shapes; stage-1 captions, stage-2 questions in English and Chinese about
   colour, shape, position and count) and three held-out splits of questions and captions: `seen`,
   `unseen-layout` and `unseen-pair` (`qwen_siglip/synthetic.py` says what each holds);
2. saves tiny random SigLIP and Qwen2 bases (with a tokenizer trained on the set's text) like Hub checkpoints;
3. runs `train_pretrain.py` then `train_sft.py` with `recipes/quickstart_*.yaml`: the same code paths as a real run;
4. scores every split with `evaluate_vlm.py --html`, which loads the result with `AutoModelForCausalLM` /
   `AutoProcessor`: exact match for questions, every colour, shape, position and count word right for captions
   (`synthetic.caption_correct`), each beside two blind baselines (another held-out image; a shape-free image on
   a training background) and chance, in one table, and a page of examples per split and task.
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


# The tiny bases: 128 wide, with random weights of std ~1/sqrt(width) instead of Qwen's 0.02 (see tiny.py); the
# README's quickstart section says why, with the commands that compare them.
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
    parser.add_argument("--n-test", type=int, default=400, help="questions in each held-out split")
    parser.add_argument("--n-caption-test", type=int, default=100, help="captions in each held-out split")
    parser.add_argument("--sft-epochs", type=float, default=None, help="override the recipe's epochs")
    parser.add_argument("--hidden", type=int, default=BASES["hidden"], help="the tiny bases' width")
    parser.add_argument("--initializer-range", type=float, default=BASES["initializer_range"],
                        help="the std of the tiny bases' random weights (Qwen's own: 0.02)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="run each seed in <out>/seed-N, then write <out>/seeds.md"
    )
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


# task -> (the score that says right, max new tokens, extra evaluate_vlm.py arguments)
TASKS = {
    "questions": ("exact_match", 8, []),
    "captions": ("caption_correct", 48, ["--scorer", "qwen_siglip.synthetic:caption_correct"]),
}
# The blind baselines: the same prompts with another held-out image of the split that was asked the same question, and
# with a shape-free image on a training background (a grey one, unlike any training image, makes the model write junk:
# that measures junk, not what the question alone gives away).
BLINDS = {"shuffled": "shuffled", "empty": "qwen_siglip.synthetic:empty_scene"}


def evaluate(checkpoint: Path, data: dict[str, Path], log: Path) -> dict:
    """Every held-out split's questions and captions through `evaluate_vlm.py --html`, as a user would run it:
    {split: {task: {right, shuffled, empty, blind (the higher), chance, examples}}}."""
    import evaluate_vlm

    blinds = [arg for spec in BLINDS.values() for arg in ("--blind", spec)]
    scores = {}
    for split in synthetic.SPLITS:
        for task, (metric, tokens, extra) in TASKS.items():
            print(f"\r  evaluating the held-out splits: {split} {task}".ljust(60), end="", flush=True)
            path = data[synthetic.heldout_name(split, task)]
            argv = ["--model", str(checkpoint), "--dataset", str(path), "--batch_size", "128", "--html",
                    "--max_new_tokens", str(tokens), *extra, *blinds,
                    "--output_dir", str(checkpoint / "eval" / split / task)]  # fmt: skip
            with quiet(log):
                s = evaluate_vlm.main(argv)["summary"]
            ran = {name: s["blind"][spec.rpartition(":")[2]] for name, spec in BLINDS.items()}
            scores.setdefault(split, {})[task] = {
                "right": s[metric], **{name: b and b[metric] for name, b in ran.items()},
                "blind": s[f"blind_{metric}"], "chance": synthetic.chance_accuracy(path), "examples": s["examples"],
            }  # fmt: skip
    return scores


COLUMNS = (("right", 9), ("shuffled", 8), ("empty", 6), ("chance", 6))  # (score, width) per task in the table


def table(scores: dict, seconds: float) -> str:
    """One row per split: each task's accuracy, its two blind baselines, chance and the number of examples."""
    header = [f"{task:>9} " + " ".join(f"{k:>{w}}" for k, w in COLUMNS[1:]) + f" {'n':>4}" for task in TASKS]
    rows = [f"{f'{seconds:.0f} s':<13} | " + " | ".join(header)]
    for split, tasks in scores.items():
        cells = [" ".join(f"{t[k]:>{w}.1%}" for k, w in COLUMNS) + f" {t['examples']:>4}" for t in tasks.values()]
        rows.append(f"{split:<13} | " + " | ".join(cells))
    return "\n".join(rows)


def run(args: argparse.Namespace, out: Path) -> dict:
    """The quickstart for one seed, in `out`; returns its summary (also written to out/summary.json)."""
    t0 = time.time()
    data = synthetic.make_shapes_dataset(
        out / "data", n_pretrain=args.n_pretrain, n_sft=args.n_sft, n_test=args.n_test,
        n_caption_test=args.n_caption_test, seed=args.seed,
    )  # fmt: skip
    texts = synthetic.corpus_texts(data.values())
    with quiet(out / "bases.log"):
        bases = BASES | {"hidden": args.hidden, "initializer_range": args.initializer_range}
        vision, text = save_tiny_bases(out / "bases", texts, image_size=synthetic.IMAGE_SIZE, seed=args.seed, **bases)
    print(f"synthetic shapes data and tiny random bases in {out} ({time.time() - t0:.0f} s); logs: {out}/*.log")
    checkpoint = train(args, out, data, vision, text)
    summary = {"seed": args.seed, "splits": evaluate(checkpoint, data, out / "evaluate.log")}
    summary["seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\r" + " " * 60 + f"\r{table(summary['splits'], summary['seconds'])}")
    print(f"checkpoint: {checkpoint} (loads with AutoModelForCausalLM/AutoProcessor, trust_remote_code=True); "
          f"pages: {checkpoint}/eval/*/*/examples.html")  # fmt: skip
    return summary


def seeds_table(summaries: list[dict]) -> str:
    """Markdown: one row per split and task, one column per seed: accuracy (the higher blind baseline, chance)."""
    lines = ["| split | task | " + " | ".join(f"seed {s['seed']}" for s in summaries) + " |"]
    lines.append("|---" * (2 + len(summaries)) + "|")
    for split in synthetic.SPLITS:
        for task in TASKS:
            cells = [s["splits"][split][task] for s in summaries]
            text = [f"{c['right']:.1%} (blind {c['blind']:.1%}, chance {c['chance']:.1%})" for c in cells]
            lines.append(f"| {split} | {task} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if not args.seeds:
        return run(args, out)
    summaries = [run(argparse.Namespace(**{**vars(args), "seed": seed}), out / f"seed-{seed}") for seed in args.seeds]
    command = "python quickstart.py --seeds " + " ".join(map(str, args.seeds))
    table_md = (f"Held-out accuracy per seed (`{command}`); in brackets the higher of the two blind baselines, and "
                f"chance\n\n{seeds_table(summaries)}\n")  # fmt: skip
    (out / "seeds.md").write_text(table_md)
    print(table_md + f"written to {out / 'seeds.md'}")
    return {"seeds": summaries}


if __name__ == "__main__":
    main()
