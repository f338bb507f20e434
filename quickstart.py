"""The embedded default: the whole two-stage pipeline on synthetic data, with no downloads, in a few CPU minutes.

    python quickstart.py                # or: make quickstart
    python quickstart.py --seeds 0 1 2  # one run per seed, then a table of the held-out scores over seeds
    python quickstart.py --stage3 dpo   # then stage 3 beside the same budget of more SFT (reuses a finished stage 2)
    python quickstart.py --stage3 grpo

1. draws a synthetic image set (coloured shapes; stage-1 captions, stage-2 questions in English and Chinese about
   colour, shape, position and count) and three held-out splits of questions and captions: `seen`,
   `unseen-layout` and `unseen-pair` (`qwen_siglip/synthetic.py` says what each holds);
2. saves tiny random SigLIP and Qwen2 bases (with a tokenizer trained on the set's text) like Hub checkpoints;
3. runs `train_pretrain.py` then `train_sft.py` with `recipes/quickstart_*.yaml`: the same code paths as a real run;
4. scores every split with `evaluate_vlm.py --html`, which loads the result with `AutoModelForCausalLM` /
   `AutoProcessor`: exact match for questions, every colour, shape, position and count word right for captions
   (`synthetic.caption_correct`), each beside two blind baselines (another held-out image; a shape-free image on
   a training background) and chance, in one table, and a page of examples per split and task;
5. with `--stage3 dpo|grpo`: trains stage 3 from that stage 2 (`train_dpo.py`/`train_grpo.py` with
   `recipes/quickstart_<dpo|grpo>.yaml`) on data drawn from training configurations only, and `train_sft.py` from
   the same checkpoint on the same records for the same steps and examples per step, then scores all three on the
   held-out splits (`qwen_siglip/shapes_stage3.py` says what the data and the scores are) in out/stage3-<method>.md.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from qwen_siglip import shapes_stage3, synthetic
from qwen_siglip.tiny import save_tiny_bases

ROOT = Path(__file__).resolve().parent


# The tiny bases: 128 wide, with random weights of std ~1/sqrt(width) instead of Qwen's 0.02 (see tiny.py); the
# README's quickstart section says why, with the commands that compare them.
BASES = dict(hidden=128, layers=2, heads=4, initializer_range=0.08)
STEP = re.compile(r"step (\d+)/(\d+) loss (-?[\d.]+)")  # trainer.ProgressLog's line


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
    # Fixed, not "all cores": another thread count sums floats in another order, which a few hundred training steps
    # carry into other answers, so the seed alone fixes the result only at a given thread count.
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in each stage")
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
    parser.add_argument("--stage3", choices=["dpo", "grpo"], help="then stage 3 and the same budget of SFT")
    parser.add_argument("--stage3-steps", type=int, default=None, help="override the stage-3 recipe's max_steps")
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


def stage2(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """The data files of a finished stage 2 in `out` (data/ and sft/ as `run` leaves them), after running it if there
    is none."""
    if (out / "sft" / "model.safetensors").exists() and (out / "data").is_dir():
        print(f"reusing the finished stage 2 in {out} (its data, sft/ and sft/eval/)")
    else:
        run(args, out)
    names = [synthetic.heldout_name(split, task) for split in synthetic.SPLITS for task in TASKS]
    return {name: out / "data" / f"{name}.jsonl" for name in names}


def stage3_data(method: str, out: Path, records: int, seed: int) -> tuple[Path, Path, str | None]:
    """(stage 3's training file, the matched SFT baseline's, the question kind GRPO trains on): DPO pairs, or GRPO
    questions of the kind stage 2 gets most wrong on the held-out splits."""
    folder = out / "data" / f"stage3-{method}"
    if method == "dpo":
        files = shapes_stage3.write_pairs(folder, records, seed)
        return files["pairs"], files["sft"], None
    before = shapes_stage3.read_predictions(out / "sft" / "eval", ["questions"])
    kind = shapes_stage3.weakest_kind({s: shapes_stage3.kind_scores(t["questions"]) for s, t in before.items()})
    prompts = shapes_stage3.write_prompts(folder, records, kind, seed)
    return prompts, prompts, kind


def records_per_step(recipe: dict, method: str) -> int:
    """Training records per optimizer step: a DPO step's batch counts pairs, a GRPO step's counts answers,
    num_generations per prompt, so its records are the prompts."""
    return recipe["global_batch_size"] // (recipe["num_generations"] if method == "grpo" else 1)


def matched_sft(recipe: dict, method: str) -> list[str]:
    """train_sft.py arguments that spend stage 3's budget: its records per step, learning rate, schedule and trained
    modules (the steps come with the arguments both runs share)."""
    per_step = records_per_step(recipe, method)
    return ["--learning_rate", str(recipe["learning_rate"]), "--lr_scheduler_type", recipe["lr_scheduler_type"],
            "--warmup_steps", str(recipe["warmup_steps"]), "--per_device_train_batch_size", str(per_step),
            "--global_batch_size", str(per_step), "--train_modules", *recipe["train_modules"]]  # fmt: skip


def run_stage3(args: argparse.Namespace, out: Path) -> dict:
    """Stage 3 and its matched SFT baseline from the stage 2 in `out`, all three scored on the held-out splits."""
    method, data = args.stage3, stage2(args, out)
    recipe = yaml.safe_load((ROOT / "recipes" / f"quickstart_{method}.yaml").read_text())
    steps = args.stage3_steps or recipe["max_steps"]
    train_file, sft_file, kind = stage3_data(method, out, steps * records_per_step(recipe, method), args.seed)
    common = ["--model_name_or_path", str(out / "sft"), "--seed", str(args.seed), "--max_steps", str(steps)]
    t0 = time.time()
    stage(f"stage 3 ({method})", f"train_{method}.py", f"quickstart_{method}.yaml", out / f"{method}.log",
          "--dataset_name", str(train_file), "--output_dir", str(out / method), *common)  # fmt: skip
    stage("the same budget of SFT", "train_sft.py", "quickstart_sft.yaml", out / f"{method}-sft.log",
          "--dataset_name", str(sft_file), "--output_dir", str(out / f"{method}-sft"), *common,
          *matched_sft(recipe, method))  # fmt: skip
    seconds = time.time() - t0
    tokens = {task: spec[1] for task, spec in TASKS.items()}
    models = {"stage 2": shapes_stage3.summarize(shapes_stage3.read_predictions(out / "sft" / "eval", TASKS))}
    for name, folder in ((f"+ {method.upper()}", out / method), ("+ SFT, same budget", out / f"{method}-sft")):
        with quiet(out / "evaluate.log"):
            models[name] = shapes_stage3.score_heldout(folder, data, tokens, folder / "eval")
    budgets = {name: shapes_stage3.budget(out / name) for name in (method, f"{method}-sft")}
    summary = dict(method=method, seed=args.seed, kind=kind, budgets=budgets, seconds=seconds, models=models)
    (out / f"stage3-{method}.json").write_text(json.dumps(summary, indent=2))
    text = stage3_table(summary)
    (out / f"stage3-{method}.md").write_text(text + "\n")
    print(f"\r{text}\nwritten to {out / f'stage3-{method}.md'}")
    return summary


def stage3_table(summary: dict) -> str:
    """Markdown, one row per split and model: questions (all, then each kind; * marks the kind GRPO trained on),
    captions right, captions hallucinating."""
    method, kind, kinds = summary["method"], summary["kind"], synthetic.KINDS
    run, sft = (
        f"{b['steps']} steps x {b['examples'] // max(1, b['steps'])} records" for b in summary["budgets"].values()
    )
    lines = [f"Stage 3 ({method}, seed {summary['seed']}): {run}; the SFT baseline {sft}, from the same checkpoint; "
             f"both trained in {summary['seconds']:.0f} s", "",
             "| split | model | questions | " + " | ".join(k + "*" * (k == kind) for k in kinds)
             + " | captions right | captions hallucinating |", "|---" * (5 + len(kinds)) + "|"]  # fmt: skip
    for split in synthetic.SPLITS:
        for name, scores in summary["models"].items():
            s = scores[split]
            cells = [s["questions"], *(s.get(k, float("nan")) for k in kinds), s["captions"], s["hallucination"]]
            lines.append(f"| {split} | {name} | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
    return "\n".join(lines)


def stage3_seeds(summaries: list[dict], method: str, out: Path, threads: int) -> dict:
    """One stage-3 run per seed -> out/stage3-<method>-seeds.md: per split and model, each seed's captions right /
    hallucinating (DPO) or questions of the kind GRPO trained on (GRPO)."""
    seeds = " ".join(str(s["seed"]) for s in summaries)
    command = f"python quickstart.py --seeds {seeds} --threads {threads} --stage3 {method}"
    cells = {"dpo": lambda s, _: f"{s['captions']:.1%} / {s['hallucination']:.1%}",
             "grpo": lambda s, kind: f"{kind} {s[kind]:.1%}, all {s['questions']:.1%}"}[method]  # fmt: skip
    what = "captions right / hallucinating" if method == "dpo" else "questions of the kind trained on, and all"
    lines = [f"Stage 3 ({method}) per seed (`{command}`): {what}", "",
             "| split | model | " + " | ".join(f"seed {s['seed']}" for s in summaries) + " |",
             "|---" * (2 + len(summaries)) + "|"]  # fmt: skip
    for split in synthetic.SPLITS:
        for model in summaries[0]["models"]:
            row = [cells(s["models"][model][split], s["kind"]) for s in summaries]
            lines.append(f"| {split} | {model} | " + " | ".join(row) + " |")
    (out / f"stage3-{method}-seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwritten to {out / f'stage3-{method}-seeds.md'}")
    return {"seeds": summaries}


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
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the stages' processes inherit it
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    once = run_stage3 if args.stage3 else run
    if not args.seeds:
        return once(args, out)
    summaries = [once(argparse.Namespace(**{**vars(args), "seed": seed}), out / f"seed-{seed}") for seed in args.seeds]
    if args.stage3:
        return stage3_seeds(summaries, args.stage3, out, args.threads)
    command = f"python quickstart.py --seeds {' '.join(map(str, args.seeds))} --threads {args.threads}"
    table_md = (f"Held-out accuracy per seed (`{command}`); in brackets the higher of the two blind baselines, and "
                f"chance\n\n{seeds_table(summaries)}\n")  # fmt: skip
    (out / "seeds.md").write_text(table_md)
    print(table_md + f"written to {out / 'seeds.md'}")
    return {"seeds": summaries}


if __name__ == "__main__":
    main()
