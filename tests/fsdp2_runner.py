"""Test helper: our model sharded with torch's FSDP2 (`fully_shard`) over gloo on CPU, under torchrun.

    torchrun --nproc_per_node 2 tests/fsdp2_runner.py <vision_base> <text_base> <out_dir>

Notable:
- The same layout as recipes/accelerate/fsdp.yaml: one shard unit per SigLIP encoder layer and per Qwen2 decoder
  layer, then the root (embeddings, projector, norms, the tied lm_head). The vision tower is frozen as in stage 2,
  so frozen and trainable parameters share the root unit.
- Each rank trains a few SGD steps on its own half of a fixed batch, then writes <out>/rank<N>.pt: every
  parameter's full value (`DTensor.full_tensor()`, a collective), whether each was a DTensor, the losses, and (rank
  0) the weights before training. Rank 0 also gathers the full state dict with `get_model_state_dict` and saves it
  with `save_pretrained` into <out>/model, for the test to reload and compare exactly.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen_siglip.collator import VLMCollator  # noqa: E402
from qwen_siglip.compose import compose, compose_model  # noqa: E402
from qwen_siglip.training import freeze  # noqa: E402

STEPS = 3


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # SGD, not AdamW: Adam scales a near-zero gradient (e.g. the k_proj bias, which softmax ignores) up to a full
    # step, so float noise between a sharded and an unsharded run would grow to ~lr; SGD keeps it at noise level.
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def fixed_batch(processor, rank: int, world: int) -> dict:
    """Eight one-turn chats about coloured squares; this rank's contiguous share of them."""
    from PIL import Image, ImageDraw

    examples = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"] * 2):
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).rectangle((4 + i, 4, 24, 24), fill=colour)
        question = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
        answer = [{"type": "text", "text": colour}]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        examples.append({"messages": messages, "images": [image]})
    share = len(examples) // world
    return VLMCollator(processor)(examples[rank * share : (rank + 1) * share])


def main(vision: str, text: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, processor = compose(vision, text)
    for p in model.parameters():  # FSDP2 does not broadcast: every rank must start from rank 0's weights
        dist.broadcast(p.data, src=0)
    freeze(model, ["projector", "language_model"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # Pitfall: shard the layers before the root, or the root unit swallows their parameters.
    for layer in [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]:
        fully_shard(layer)
    fully_shard(model)

    model.train()
    optimizer = make_optimizer(model)
    batch = fixed_batch(processor, rank, world)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()  # FSDP2 reduce-scatters (averages) the gradients over the ranks here
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    is_dtensor = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}  # collective: all ranks
    result = dict(full=full, is_dtensor=is_dtensor, losses=losses, before=before if rank == 0 else None)
    torch.save(result, out / f"rank{rank}.pt")

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
    state = get_model_state_dict(model, options=options)  # collective too
    if rank == 0:
        fresh = compose_model(vision, text)
        fresh.load_state_dict(state, strict=True)
        fresh.save_pretrained(out / "model")
        processor.save_pretrained(out / "model")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
