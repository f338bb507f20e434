"""Stage 3, GRPO: answers sampled from the model itself, scored by reward functions, from a stage-2 model.

Starts from the stage-2 output. For every prompt TRL's `GRPOTrainer` samples `--num_generations` answers with our
model's `generate` (images in, KV cache on, stops at `<|im_end|>`), scores them with the rewards (`--reward_funcs`:
exact_match, length_format, or module:function) against the record's last assistant turn, and weights each
answer by how it scored against the others. Defaults: lr 1e-6, 8 answers per prompt of at most 64 tokens,
temperature 1.0, beta 0 (no reference model), global batch 64 answers. Prompts: any format the data module reads.

    accelerate launch train_grpo.py --config recipes/grpo.yaml

or, spelled out:

    accelerate launch train_grpo.py \\
        --model_name_or_path outputs/qwen-siglip-sft \\
        --dataset_name data/vqa/train.jsonl --image_root data/vqa/images \\
        --reward_funcs exact_match length_format \\
        --output_dir outputs/qwen-siglip-grpo
"""

from qwen_siglip.cli import run
from qwen_siglip.stage3 import main

if __name__ == "__main__":
    run(main, "grpo")
