"""The model: merge, loss, generation, pixel shuffle, attention implementations and bad input."""

import os
import threading

import pytest
import torch
from conftest import build_tiny, shape_image, user_turn
from transformers import TextIteratorStreamer

from configuration_qwen_siglip import QwenSiglipConfig
from modeling_qwen_siglip import pixel_shuffle


def prompt_inputs(processor, question="What colour is it?", images=None, **kwargs):
    images = [shape_image()] if images is None else images
    text = processor.apply_chat_template(user_turn(question, len(images)), add_generation_prompt=True)
    return processor(images=images or None, text=text, return_tensors="pt", **kwargs)


def test_image_features_replace_exactly_the_image_tokens(tiny):
    model, processor = tiny
    x = prompt_inputs(processor)
    n_image_tokens = int((x["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == model.config.num_image_tokens == 16
    with torch.no_grad():
        red = model(**x).logits
        blue = model(**prompt_inputs(processor, images=[shape_image("blue")])).logits
    # Positions before the first image token cannot see the image (causal): identical. After it: different.
    first = int((x["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert torch.equal(red[:, :first], blue[:, :first])
    assert not torch.allclose(red[:, -1], blue[:, -1])


def test_image_tokens_are_ignored_in_loss(tiny):
    model, processor = tiny
    x = prompt_inputs(processor)
    labels = x["input_ids"].clone()
    with torch.no_grad():
        loss = model(**x, labels=labels).loss
        manual = labels.clone()
        manual[labels == model.config.image_token_id] = -100
        expected = model(**x, labels=manual).loss
    assert torch.allclose(loss, expected)
    # and the image positions really carried weight before masking (so the test can fail)
    logits = model(**x).logits.detach()
    unmasked = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert not torch.allclose(loss, unmasked)


def test_frozen_vision_tower_keeps_no_activations(tiny_bases):
    model, processor = build_tiny(tiny_bases, spread=False)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    seen = {}
    model.model.vision_tower.register_forward_hook(lambda m, i, o: seen.update(grad=o.last_hidden_state.requires_grad))
    x = prompt_inputs(processor)
    model(**x, labels=x["input_ids"]).loss.backward()
    assert seen["grad"] is False
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None


def test_generate_with_cache_matches_no_cache(tiny):
    model, processor = tiny
    x = prompt_inputs(processor)
    with_cache = model.generate(**x, max_new_tokens=12, do_sample=False, use_cache=True)
    without = model.generate(**x, max_new_tokens=12, do_sample=False, use_cache=False)
    new = with_cache[0, x["input_ids"].shape[1] :]
    assert len(set(new.tolist())) > 1, "degenerate model: the comparison would be vacuous"
    assert torch.equal(with_cache, without)


def test_left_padded_batch_matches_each_prompt_alone(tiny):
    model, processor = tiny
    questions = ["What colour is it?", "Describe the picture in a few words, please."]
    images = [shape_image("red"), shape_image("green", box=(20, 4, 44, 40))]
    texts = [processor.apply_chat_template(user_turn(q), add_generation_prompt=True) for q in questions]
    batch = processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "prompts must differ in length for padding to be tested"
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    for i, (q, img) in enumerate(zip(questions, images)):
        alone = prompt_inputs(processor, q, [img])
        single = model.generate(**alone, max_new_tokens=8, do_sample=False)
        assert out[i, batch["input_ids"].shape[1] :].tolist() == single[0, alone["input_ids"].shape[1] :].tolist()


def test_text_iterator_streamer_streams(tiny):
    model, processor = tiny
    x = prompt_inputs(processor)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**x, max_new_tokens=10, streamer=streamer))
    thread.start()
    chunks = list(streamer)
    thread.join()
    reference = model.generate(**x, max_new_tokens=10, do_sample=False)
    expected = processor.tokenizer.decode(reference[0, x["input_ids"].shape[1] :])
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == expected


def test_text_only_prompt_works(tiny):
    model, processor = tiny
    text = processor.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    x = processor(text=text, return_tensors="pt")
    assert "pixel_values" not in x
    out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > x["input_ids"].shape[1]


def test_pixel_shuffle_groups_neighbouring_patches():
    # 4x4 grid of 1-dim features numbered row-major; factor 2 must gather each 2x2 block into one token.
    x = torch.arange(16.0).view(1, 16, 1)
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5]
    assert y[0, 3].tolist() == [10, 11, 14, 15]


def test_pixel_shuffle_factor_2_reduces_image_tokens_4x_and_trains_and_generates(tiny_bases):
    model, processor = build_tiny(tiny_bases, spread=False, pixel_shuffle_factor=2)
    assert model.config.num_image_tokens == 4 == processor.num_image_tokens
    x = prompt_inputs(processor)
    assert int((x["input_ids"] == model.config.image_token_id).sum()) == 4
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    assert model.generate(**x, max_new_tokens=3).shape[1] == x["input_ids"].shape[1] + 3


@pytest.mark.parametrize("factor", [3, 0])
def test_impossible_pixel_shuffle_is_rejected(factor):
    with pytest.raises(ValueError, match="pixel_shuffle_factor"):
        QwenSiglipConfig(pixel_shuffle_factor=factor)  # 14x14 grid: 3 does not divide it, 0 is not a factor


def test_eager_and_sdpa_give_same_logits(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    x = prompt_inputs(processor)
    logits = {}
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True, attn_implementation=impl)
        # the choice must reach both sub-models, not just the wrapper
        assert model.model.language_model.config._attn_implementation == impl
        assert model.model.vision_tower.config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(**x).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-4, rtol=1e-4)


def test_image_token_feature_mismatch_names_the_problem(tiny):
    model, processor = tiny
    x = prompt_inputs(processor)
    two_images = torch.cat([x["pixel_values"], x["pixel_values"]])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=x["input_ids"], pixel_values=two_images)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=x["input_ids"])


def test_wrong_pixel_size_is_rejected(tiny):
    model, processor = tiny
    x = prompt_inputs(processor)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 32, 32\)"):
        model(input_ids=x["input_ids"], pixel_values=torch.zeros(1, 3, 64, 64))


def test_two_ranks_train_the_vision_tower_with_activation_checkpointing(tiny_checkpoint, shapes_data, tmp_path):
    # With find_unused_parameters=False (transformers' Trainer default under activation checkpointing, and the
    # fast setting; TRL 1.16 turns the search on for VLMs unless told), any trainable parameter that gets no
    # gradient (SigLIP's post_layernorm, when features come from hidden_states) fails DDP at step 2.
    import subprocess
    import sys

    from conftest import CPU_RUN, ROOT

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    args = ["sft", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name", str(shapes_data["sft_train"]),
            "--output_dir", str(tmp_path / "ddp"), *CPU_RUN, "--activation_checkpointing", "true",
            "--train_modules", "projector", "language_model", "vision_tower", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--global_batch_size", "4", "--ddp_backend", "gloo",
            "--ddp_find_unused_parameters", "false"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "QS_DUMP_WEIGHTS": str(tmp_path)}
    cmd = [*torchrun, str(ROOT / "tests" / "stage_runner.py"), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert any(k.startswith("model.vision_tower.") for k in rank0)  # the tower did train
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
