"""The data-pipeline benchmark: samples/s of DataLoader(VLMDataset) + VLMCollator, against the training step's.

JPEG decode, RGB, resize to 224, normalise, chat template, tokenize, labels, pad; at the Trainer's default 0 workers
and the recipes' 4. At 0 workers loading runs inside the training process, serially: the strict case.
"""

import time

import torch

from qwen_siglip.collator import VLMCollator


def bench_data(dataset, collator: VLMCollator, batch_size: int, workers: int) -> dict:
    """Samples/s the loader delivers once running (the first batch, which pays for worker start-up, is not timed)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator)
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for batch in it:
        n += batch["input_ids"].shape[0]
    return {"workers": workers, "batch": batch_size, "samples": n, "samples_per_s": n / (time.perf_counter() - start)}
