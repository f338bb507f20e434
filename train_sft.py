"""Stage 2 (instruction tuning): vision tower frozen, projector and LM learn (or LoRA on the LM).

Starts from the stage-1 output with LLaVA-1.5's stage-2 defaults: lr 2e-5, cosine, 3% warm-up, 1 epoch, global
batch 128. `--use_peft` puts LoRA on the LM's linear layers and trains the projector in full; `--merge_adapter`
saves a plain merged checkpoint at the end. `--projector_lr` gives the projector its own learning rate.

    accelerate launch train_sft.py --config recipes/chinese_sft.yaml

or, spelled out:

    accelerate launch train_sft.py \\
        --model_name_or_path outputs/qwen-siglip-pretrain \\
        --dataset_name data/minimind-v/sft_data.jsonl --image_root data/minimind-v/images \\
        --output_dir outputs/qwen-siglip-sft
"""

from qwen_siglip.cli import run
from qwen_siglip.training import main

if __name__ == "__main__":
    run(main, "sft")
