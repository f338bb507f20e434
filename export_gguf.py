"""Export a QwenSiglip checkpoint to GGUF for llama.cpp and the tools built on it (Ollama, LM Studio, ...).

    python export_gguf.py --model outputs/quickstart/sft --output outputs/gguf --outtype f16 q8_0
    python export_gguf.py --model outputs/my-model --output outputs/my-model-gguf --outtype q8_0 \
        --push_to_hub --hub_model_id user/my-model-GGUF

Writes the language model as llama.cpp's `qwen2` (one file per --outtype: f32, f16, q8_0, q4_k_m; tokenizer and
chat template inside) and the vision tower + projector as an mmproj file, plus a README.md naming them. Quantised
types go through llama.cpp's own quantiser (llama-cpp-python). A checkpoint llama.cpp cannot run as we do (pixel
shuffle, RoPE scaling, ...) is refused with the reason. The conversion is `qwen_siglip.gguf_export`.
"""

import argparse
from pathlib import Path

from qwen_siglip.gguf_export import OUTTYPES, export, push


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="QwenSiglip checkpoint folder (pixel_shuffle_factor=1)")
    parser.add_argument("--output", required=True, help="new or empty folder for the GGUF files")
    parser.add_argument("--outtype", nargs="+", default=["f16"], choices=sorted(OUTTYPES), help="LM file type(s)")
    parser.add_argument("--name", default=None, help="file name stem; default: the checkpoint folder's name")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the folder to --hub_model_id")
    parser.add_argument("--hub_model_id", default=None, help="Hub repo, e.g. user/my-model-GGUF (created if needed)")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo private")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id user/name (the community names GGUF repos <model>-GGUF)")
    files = export(args.model, args.output, args.outtype, name=args.name)
    if args.push_to_hub:
        print(f"pushed: {push(Path(args.output), args.hub_model_id, private=args.hub_private_repo or None)}")
    return files


if __name__ == "__main__":
    from qwen_siglip.cli import run

    run(main)
