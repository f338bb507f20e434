"""Stage 3, DPO: preference pairs (RLAIF-V style: the right answer vs a hallucinated one) from a stage-2 model.

Starts from the stage-2 output. TRL's `DPOTrainer` raises the likelihood of the chosen answer over the rejected one,
measured against the starting model, which stays frozen as the reference (with `--use_peft`, the same weights with
the adapter off: no second copy). Defaults: beta 0.1, lr 5e-7, cosine, 3% warm-up, 1 epoch, global batch 64 pairs.
Data: TRL's preference format (`prompt`/`chosen`/`rejected` + `images`) or RLAIF-V's (`image`, `question`,
`chosen`, `rejected`), from a file, a folder or a Hub id.

    accelerate launch train_dpo.py --config recipes/dpo.yaml

or, spelled out:

    accelerate launch train_dpo.py \\
        --model_name_or_path outputs/qwen-siglip-sft \\
        --dataset_name openbmb/RLAIF-V-Dataset \\
        --output_dir outputs/qwen-siglip-dpo
"""

from qwen_siglip.cli import run
from qwen_siglip.stage3 import main

if __name__ == "__main__":
    run(main, "dpo")
