"""Export a QwenSiglip checkpoint to transformers' own LLaVA: a folder that loads with no remote code at all.

    python export_llava.py --model outputs/quickstart/sft --output outputs/llava-export

The result is a `LlavaForConditionalGeneration` + `LlavaProcessor` folder in the llava-hf layout, for transformers
serve, vLLM, SGLang and lmms-eval. A checkpoint with pixel shuffle is refused: LLaVA has no step for it. The
conversion is `qwen_siglip.llava` (`to_llava` does it in memory).
"""

import argparse
from pathlib import Path

from qwen_siglip.llava import export


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="QwenSiglip checkpoint folder (pixel_shuffle_factor=1)")
    parser.add_argument("--output", required=True, help="new or empty folder for the LLaVA checkpoint")
    args = parser.parse_args(argv)
    return export(args.model, args.output)


if __name__ == "__main__":
    from qwen_siglip.cli import run

    run(main)
