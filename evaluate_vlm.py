"""Evaluate a checkpoint on a held-out set: answers by batched greedy generation, scored against the references.

    python evaluate_vlm.py --model outputs/quickstart/sft --dataset outputs/quickstart/data/sft_test.jsonl --limit 200

Named `evaluate_vlm.py`, not `evaluate.py`: run from the repo root, a file `evaluate.py` would be imported by every
`import evaluate` in the process, and Hugging Face's own `evaluate` library is imported under that name.

Notable (the work is in `qwen_siglip.evaluation`, `metrics`, `inference` and `card`):
- Any format the data module reads works; each example's last assistant turn is the reference.
- VQA-style normalised exact match, BLEU-4 and CIDEr-D, beside blind baselines: the same prompts with each
  example's images replaced (`--blind`: `shuffled`, another example's images; `blank`, grey; or module:function,
  `(image, index) -> image`). Both built-in ones by default; the summary's `blind_*` is the highest.
- `--scorer module:function` adds a metric of your own (the quickstart uses
  `qwen_siglip.synthetic:caption_correct`).
- `--html` writes `examples.html` beside `summary.json`: the scores, then every example's image, question, answer,
  reference and blind answers, wrong ones first; one self-contained file (`qwen_siglip.gallery`).
- A Hub id needs `--trust_remote_code` (its code runs here), with `--revision` to pin what you read.
- Writes `predictions.jsonl` and `summary.json` to `--output_dir`; `--write_card` also puts the scores into the model
  folder's README.md as `model-index` metadata, and `--push_to_hub` uploads the folder as training pushes it.
"""

import argparse
import json
from pathlib import Path

from qwen_siglip.evaluation import DEFAULT_BLINDS, evaluate, load_blind, load_scorer
from qwen_siglip.hub import display_name
from qwen_siglip.inference import load_model, remote_code_allowed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--trust_remote_code", action="store_true", help="needed for a Hub id: runs its code")
    parser.add_argument("--revision", default=None, help="the Hub commit (or branch/tag) to load")
    parser.add_argument("--dataset", required=True, help="any format the data module reads")
    parser.add_argument("--image_root", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--scorer", action="append", default=[], help="module:function, a metric of your own")
    parser.add_argument(
        "--blind", action="append", default=None,
        help=f"a blind baseline: shuffled, blank or module:function (repeat for several; default: {DEFAULT_BLINDS})",
    )  # fmt: skip
    parser.add_argument("--output_dir", default=None, help="default: <model>/eval")
    parser.add_argument("--html", action="store_true", help="also write examples.html, a page of the scored examples")
    parser.add_argument(
        "--write_card", action="store_true", help="put the scores into <model>/README.md as model-index metadata"
    )
    parser.add_argument(
        "--push_to_hub", metavar="REPO_ID", default=None,
        help="then upload the model folder (its card with the scores) as training pushes it: eval/ stays local",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        remote_code_allowed(args.model, args.trust_remote_code)  # before any download or data loading
        if (args.write_card or args.push_to_hub) and not Path(args.model).is_dir():
            raise ValueError("--write_card and --push_to_hub work on <model>, so --model must be a local folder")
        args.scorers = dict(load_scorer(spec) for spec in args.scorer)
        args.blinds = dict(load_blind(spec) for spec in args.blind or DEFAULT_BLINDS)
    except (ValueError, ImportError, AttributeError) as e:
        parser.error(str(e))
    return args


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for p in result["predictions"]:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2))


def blind_scores(summary: dict, key: str, style: str = ".1%") -> str:
    """'blind 35.0%: shuffled 35.0%, blank 12.0%' (the highest, then each), or 'no blind baseline'."""
    ran = {name: b[key] for name, b in summary["blind"].items() if b and b[key] is not None}
    each = ", ".join(f"{name} {value:{style}}" for name, value in ran.items())
    return f"blind {summary[f'blind_{key}']:{style}}: {each}" if ran else "no blind baseline"


def report(summary: dict, scorers: dict) -> str:
    """The one line the command prints."""
    s = summary
    extra = "".join(f"  {k} {s[k]:.1%} ({blind_scores(s, k)})" for k in scorers if s[k] is not None)
    skipped = ", ".join(f"{reason} {k}" for reason, k in s["skipped"].items())
    return (
        f"exact match {s['exact_match']:.1%} ({blind_scores(s, 'exact_match')})  BLEU-4 {s['bleu4']:.3f}  "
        f"CIDEr {s['cider']:.3f} ({blind_scores(s, 'cider', '.3f')}){extra}  |  {s['examples']} examples"
        + (f", skipped: {skipped}" if skipped else "")
    )


def write_html(args: argparse.Namespace, result: dict, out: Path) -> Path:
    """examples.html beside summary.json, titled by display names (no path of this machine goes into the page)."""
    from qwen_siglip.gallery import write_page

    title = f"{display_name(args.model)} on {display_name(args.dataset)}"
    return write_page(out / "examples.html", result, title, primary=next(iter(args.scorers), "exact_match"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from qwen_siglip.data import load_vlm_dataset, require_usable

    model, processor = load_model(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    dataset = load_vlm_dataset(args.dataset, args.image_root, split=args.split, limit=args.limit)
    require_usable(dataset)  # nothing to score is an error, not "exact match 0.0% | 0 examples"
    examples = [dataset[i] for i in range(len(dataset))]
    result = evaluate(model, processor, examples, args.batch_size, args.max_new_tokens, args.scorers, args.blinds)
    if not result["summary"]["examples"]:  # before any file or card is written
        raise ValueError(f"no example of {args.dataset} could be evaluated: skipped {result['summary']['skipped']}")
    out = Path(args.output_dir or Path(args.model) / "eval")
    write_results(result, out)
    print(report(result["summary"], args.scorers))
    if args.html:
        print(f"examples page: {write_html(args, result, out)}")
    if args.write_card:
        from qwen_siglip.card import write_model_index

        card = write_model_index(args.model, result["summary"], args.dataset, args.split, args.limit)
        print(f"scores written to {card.name}'s model-index; push the folder to show them on the Hub")
    if args.push_to_hub:
        from qwen_siglip.hub import push_folder  # the same upload as training's: no checkpoints, args or eval/

        print(f"pushed: {push_folder(Path(args.model), args.push_to_hub)}")
    return result


if __name__ == "__main__":
    from qwen_siglip.cli import run

    run(main)
