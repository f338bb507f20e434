"""Stage 1 (alignment): vision tower and LM frozen, only the projector learns, on caption data.

Composes a fresh model from two base checkpoints (Hub ids or local folders) and trains its projector with
LLaVA-1.5's stage-1 defaults: lr 1e-3, cosine, 3% warm-up, 1 epoch, global batch 256.

    accelerate launch train_pretrain.py --config recipes/cc3m_pretrain.yaml

or, spelled out:

    accelerate launch train_pretrain.py \\
        --vision_model google/siglip-base-patch16-224 --text_model Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name data/LLaVA-CC3M-Pretrain-595K/chat.json --image_root data/LLaVA-CC3M-Pretrain-595K/images \\
        --output_dir outputs/qwen-siglip-pretrain
"""

from qwen_siglip.cli import run
from qwen_siglip.training import main

if __name__ == "__main__":
    run(main, "pretrain")
