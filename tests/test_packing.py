"""Padding-free and packed batches, length grouping: the same training as padded batches, without the padding."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CPU_RUN, ROOT, run_stage, shape_image, torchrun
from safetensors.torch import load_file
from trl.trainer.utils import add_fused_lm_head

from qwen_siglip import packing
from qwen_siglip.collator import IGNORE_INDEX, VLMCollator
from qwen_siglip.data import load_vlm_dataset


def chat(question: str, answer: str, color: str = "red", turns: int = 1) -> dict:
    """A chat with one image; `turns` question/answer pairs make it longer."""
    messages = []
    for t in range(turns):
        image = [{"type": "image"}] if t == 0 else []
        messages.append({"role": "user", "content": [*image, {"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"messages": messages, "images": [shape_image(color)]}


SAMPLES = [
    chat("What colour is the shape?", "red"),
    chat("Describe the image in detail.", "a blue square on a white background, near the top", "blue", turns=3),
    chat("Where is it?", "top left", "green", turns=2),
]


def samples(n: int = 3) -> list[dict]:
    return SAMPLES[:n]


def spans(position_ids: torch.Tensor) -> list[slice]:
    """Each sample's stretch of a padding-free row, from where position_ids restart at 0."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


# ----------------------------------------------------------------------------- the collator


def test_padding_free_batch_is_one_row_with_positions_restarting_per_sample(tiny):
    _, processor = tiny
    padded = VLMCollator(processor)(samples())
    free = packing.PaddingFreeCollator(processor)(samples())
    lengths = padded["attention_mask"].sum(1).tolist()
    assert free["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in free
    assert [s.stop - s.start for s in spans(free["position_ids"])] == lengths
    for b, s in enumerate(spans(free["position_ids"])):
        assert free["position_ids"][0, s].tolist() == list(range(lengths[b]))
        assert torch.equal(free["input_ids"][0, s], padded["input_ids"][b, : lengths[b]])
    assert torch.equal(free["pixel_values"], padded["pixel_values"])  # images in order of appearance


def test_no_target_crosses_a_sample_boundary_and_targets_equal_the_padded_ones(tiny):
    _, processor = tiny
    padded = VLMCollator(processor)(samples())
    free = packing.PaddingFreeCollator(processor)(samples())
    labels = free["labels"][0]
    for s in spans(free["position_ids"]):
        assert labels[s.start] == IGNORE_INDEX  # what the previous sample's last token would be trained to predict
    # The loss shifts labels left by one: the (input token -> target) pairs must be the padded batch's, no more.
    pairs = lambda ids, lab: sorted(zip(ids[:-1].tolist(), lab[1:].tolist()))  # noqa: E731
    padded_pairs = sorted(
        p
        for b in range(len(padded["input_ids"]))
        for p in pairs(padded["input_ids"][b], padded["labels"][b])
        if p[1] != IGNORE_INDEX
    )
    free_pairs = [p for p in pairs(free["input_ids"][0], labels) if p[1] != IGNORE_INDEX]
    assert sorted(free_pairs) == padded_pairs


def test_first_label_of_a_sample_is_masked_even_when_the_collator_labels_it(tiny):
    _, processor = tiny

    class LabelsEverything(packing.PaddingFreeCollator):
        def encode(self, example):
            ids, _, pixels = super().encode(example)
            return ids, list(ids), pixels

    free = LabelsEverything(processor)(samples())
    starts = [s.start for s in spans(free["position_ids"])]
    assert [free["labels"][0, i].item() for i in starts] == [IGNORE_INDEX] * 3


# ----------------------------------------------------------------------------- attention and the loss


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_changing_one_packed_sample_leaves_the_others_logits_unchanged(tiny, attn):
    model, processor = tiny
    model = copy.deepcopy(model)
    model.set_attn_implementation(attn)
    collate = packing.PaddingFreeCollator(processor)
    changed = [SAMPLES[0], chat("Is there a circle? Answer briefly.", "no, a square", "yellow"), SAMPLES[2]]
    a, b = collate(samples()), collate(changed)
    la, lb = logits(model, a), logits(model, b)
    (a0, a1, a2), (b0, b1, b2) = spans(a["position_ids"]), spans(b["position_ids"])
    torch.testing.assert_close(la[a0], lb[b0], rtol=0, atol=1e-5)  # before the change: trivially causal
    torch.testing.assert_close(la[a2], lb[b2], rtol=0, atol=1e-5)  # after it: only if attention stays in its sample
    assert not torch.allclose(la[a1][-1], lb[b1][-1])  # the changed sample did change
    # Each sample's logits are those it has alone.
    alone = logits(model, VLMCollator(processor)([SAMPLES[2]]))
    torch.testing.assert_close(la[a2], alone, rtol=0, atol=1e-4)
    # Control: the same row without restarting positions would attend across samples (the test can fail).
    flat = {**a, "position_ids": torch.arange(a["input_ids"].shape[1])[None]}
    assert not torch.allclose(logits(model, flat)[a2], la[a2], atol=1e-3)


def test_attention_that_would_cross_samples_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(_attn_implementation="x")))
    with pytest.raises(ValueError, match="would attend across samples.*--attn_implementation"):
        packing.check_attention(model)


def num_items(batches: list[dict]) -> torch.Tensor:
    """What the Trainer passes as num_items_in_batch: label tokens after the shift, over the whole accumulation."""
    return sum((b["labels"][..., 1:] != IGNORE_INDEX).sum() for b in batches)


def accumulate(model, batches: list[dict], fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one optimizer step over `batches` (gradient accumulation), as the Trainer computes."""
    model.zero_grad(set_to_none=True)
    n, total = num_items(batches), 0.0
    for batch in batches:
        out = model(**batch, num_items_in_batch=n, **({"fused_lm_head": True} if fused else {}))
        out.loss.backward()
        total += out.loss.item()
    return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False], ids=["trl_fused_head", "model_loss"])
def test_padding_free_loss_and_gradients_equal_the_padded_batches(tiny, fused):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    if fused:
        add_fused_lm_head(model)  # what SFTTrainer trains with
    micro = [samples(2), [SAMPLES[2], SAMPLES[0]]]  # two micro-batches, one accumulation step
    padded = [VLMCollator(processor)(m) for m in micro]
    free = [packing.PaddingFreeCollator(processor)(m) for m in micro]
    assert num_items(free) == num_items(padded)
    loss_p, grads_p = accumulate(model, padded, fused)
    loss_f, grads_f = accumulate(model, free, fused)
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) > 10
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-4, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- lengths and samplers


def test_cheap_lengths_equal_the_collators_without_decoding_images(tiny, shapes_data, monkeypatch):
    _, processor = tiny
    dataset = load_vlm_dataset(str(shapes_data["sft_train"]))
    expected = [len(VLMCollator(processor).encode(dataset[i])[0]) for i in range(len(dataset))]
    monkeypatch.setattr(type(dataset), "__getitem__", lambda *a: pytest.fail("an image was decoded"))
    assert packing.cheap_lengths(dataset, processor, chunk=5) == expected
    assert packing.cheap_lengths(dataset, processor, max_length=min(expected)) == [min(expected)] * len(expected)


def test_best_fit_decreasing_packs_every_item_once_within_capacity():
    lengths = [7, 5, 5, 4, 3, 3, 2, 2, 1, 12]
    bins = packing.best_fit_decreasing(list(enumerate(lengths)), capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    # 32 tokens of small items fill 3 bins of 10 exactly (the optimum: 4 bins); the long one goes alone (the collator
    # truncates it later, safely; a sample is never split)
    assert sorted(sum(lengths[i] for i in b) for b in bins) == [2, 10, 10, 10, 12]
    assert [12] in [[lengths[i] for i in b] for b in bins]


def test_packed_sampler_trains_every_sample_once_per_epoch_deterministically():
    lengths = [int(x) for x in torch.randint(20, 300, (200,), generator=torch.Generator().manual_seed(0))]
    sampler = packing.PackedBatchSampler(lengths, capacity=512, rows=2, seed=3, buffer_size=64)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(200))  # each sample exactly once
        assert all(sum(lengths[i] for i in b) <= 2 * 512 for b in batches)
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    again = packing.PackedBatchSampler(lengths, capacity=512, rows=2, seed=3, buffer_size=64)
    again.set_epoch(1)
    assert list(again) == epochs[1]  # a resumed run sees the same batches
    assert sampler.fill > 0.9


def test_length_grouped_batches_hold_every_sample_once_with_less_padding():
    lengths = [int(x) for x in torch.randint(20, 1000, (256,), generator=torch.Generator().manual_seed(0))]
    sampler = packing.LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, group=8)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(256)) and len(batches) == len(sampler)
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    random_batches = [list(range(k, k + 8)) for k in range(0, 256, 8)]
    assert padded(batches) < 0.75 * padded(random_batches)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first: out of memory at step 1


# ----------------------------------------------------------------------------- training runs


def sft_args(start: Path, data, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model_name_or_path", str(start), "--dataset_name", str(data["sft_train"]),
            "--output_dir", str(out), *CPU_RUN, "--max_length", "128", "--packing", "true", *extra]  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_packed_training_is_resumable_after_sigkill(tiny_checkpoint, shapes_data, tmp_path):
    steps = ["--max_steps", "4", "--per_device_train_batch_size", "1", "--global_batch_size", "1",
             "--save_strategy", "steps", "--save_steps", "2"]  # fmt: skip
    unbroken = run_stage(sft_args(tiny_checkpoint, shapes_data, tmp_path / "unbroken", *steps), {})
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    assert "packs of 128" in unbroken.stderr
    crashed = run_stage(sft_args(tiny_checkpoint, shapes_data, tmp_path / "crashed", *steps), {"QS_KILL_AT_STEP": "2"})
    assert crashed.returncode == -9
    resume = ["--resume_from_checkpoint", str(tmp_path / "crashed" / "checkpoint-2")]
    resumed = run_stage(sft_args(tiny_checkpoint, shapes_data, tmp_path / "crashed", *steps, *resume), {})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "unbroken"), weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert any(not torch.equal(a[k], weights(tiny_checkpoint)[k]) for k in a)  # and it did train


def test_packed_training_on_two_cpu_ranks_ends_with_identical_weights(tiny_checkpoint, shapes_data, tmp_path):
    steps = ["--max_steps", "3", "--per_device_train_batch_size", "1", "--global_batch_size", "2"]
    args = sft_args(tiny_checkpoint, shapes_data, tmp_path / "ddp", *steps, "--ddp_backend", "gloo")
    result = run_stage(args, {"QS_DUMP_WEIGHTS": str(tmp_path)}, launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)


def test_group_by_length_and_padding_free_train_in_process(tiny_checkpoint, shapes_data, tmp_path):
    from qwen_siglip import training

    for flags in (["--group_by_length", "true"], ["--padding_free", "true"]):
        out = tmp_path / flags[0].strip("-")
        argv = sft_args(tiny_checkpoint, shapes_data, out, "--max_steps", "2", "--packing", "false", *flags)[1:]
        training.main("sft", argv)
        assert (out / "model.safetensors").exists()
        assert json.loads((out / "config.json").read_text())["model_type"]


@pytest.mark.parametrize(
    "recipe, stage, on",
    [
        ("chinese_sft", "sft", True),
        ("lora_sft", "sft", True),
        ("cc3m_pretrain", "pretrain", False),
    ],
)
def test_recipes_turn_padding_free_on_for_mixed_length_stage2_only(recipe, stage, on):
    from qwen_siglip import training

    cpu = ["--use_cpu", "true", "--bf16", "false"]  # the GPU recipes ask for bf16, which refuses to parse on a CPU
    _, args, _ = training.parse_args(stage, ["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *cpu])
    assert args.padding_free is on and args.packing is False
