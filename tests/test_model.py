"""The model: merge, loss, generation, pixel shuffle, attention implementations, transformers' model contract and
bad input."""

import os
import threading

import pytest
import torch
from conftest import build_tiny, shape_image, torchrun, user_turn
from transformers import TextIteratorStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling

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

    from conftest import CPU_RUN, ROOT

    args = ["sft", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name", str(shapes_data["sft_train"]),
            "--output_dir", str(tmp_path / "ddp"), *CPU_RUN, "--activation_checkpointing", "true",
            "--train_modules", "projector", "language_model", "vision_tower", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--global_batch_size", "4", "--ddp_backend", "gloo",
            "--ddp_find_unused_parameters", "false"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "QS_DUMP_WEIGHTS": str(tmp_path)}
    cmd = [*torchrun(), str(ROOT / "tests" / "stage_runner.py"), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert any(k.startswith("model.vision_tower.") for k in rank0)  # the tower did train
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------- transformers' model contract
# What transformers' common tests check and its LLaVA passes, for pixel shuffle 1 and 2, tied and untied heads.

VARIANTS = {"shuffle1-tied": (1, True), "shuffle2-tied": (2, True), "shuffle1-untied": (1, False),
            "shuffle2-untied": (2, False)}  # fmt: skip


@pytest.fixture(scope="module")
def untied_bases(tmp_path_factory):
    """Tiny bases whose LM has its own lm_head (tie_word_embeddings=False)."""
    from qwen_siglip.tiny import save_tiny_bases

    return save_tiny_bases(tmp_path_factory.mktemp("untied"), tie_word_embeddings=False)


@pytest.fixture(scope="module", params=list(VARIANTS.values()), ids=list(VARIANTS))
def variant(request, tiny_bases, untied_bases):
    """(model, processor) for one variant. Tests must not modify them."""
    factor, tied = request.param
    torch.manual_seed(0)
    model, processor = build_tiny(tiny_bases if tied else untied_bases, pixel_shuffle_factor=factor)
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    return model, processor


def test_return_dict_false_returns_the_same_tensors_as_a_tuple(variant):
    model, processor = variant
    x = prompt_inputs(processor)
    with torch.no_grad():
        out = model(**x, labels=x["input_ids"])
        loss, logits, *_ = model(**x, labels=x["input_ids"], return_dict=False)
        body = model.model(**x, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    assert isinstance(body, tuple) and body[0].shape[:2] == x["input_ids"].shape


def embeds_of(model, x) -> dict:
    """The same prompt as inputs_embeds: the token embeddings, image placeholders included, plus the pixels."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(x["input_ids"])
    return {"inputs_embeds": embeds, "pixel_values": x["pixel_values"], "attention_mask": x["attention_mask"]}


def test_inputs_embeds_with_pixel_values_give_the_input_ids_logits(variant):
    model, processor = variant
    x = prompt_inputs(processor, images=[shape_image("red"), shape_image("blue", box=(0, 0, 20, 40))])
    with torch.no_grad():
        torch.testing.assert_close(model(**embeds_of(model, x)).logits, model(**x).logits)


def test_generate_from_inputs_embeds_and_pixel_values_matches_input_ids(variant):
    model, processor = variant
    x = prompt_inputs(processor)
    from_ids = model.generate(**x, max_new_tokens=6, do_sample=False)[:, x["input_ids"].shape[1] :]
    from_embeds = model.generate(**embeds_of(model, x), max_new_tokens=6, do_sample=False)  # new tokens only
    assert len(set(from_ids[0].tolist())) > 1, "degenerate model: the comparison would be vacuous"
    assert torch.equal(from_embeds, from_ids)


@pytest.fixture
def prefers_image_token(variant):
    """The variant's model with its image-token logit pushed far above the rest (removed after the test)."""
    model, processor = variant
    image_token = model.config.image_token_id

    def boost(module, args, logits):
        logits[..., image_token] += 1e4

    handle = model.lm_head.register_forward_hook(boost)
    yield model, processor
    handle.remove()


def test_a_model_that_prefers_the_image_token_never_generates_it(prefers_image_token):
    model, processor = prefers_image_token
    x = prompt_inputs(processor)
    new = model.generate(**x, max_new_tokens=4, do_sample=False)[0, x["input_ids"].shape[1] :]
    assert len(new) == 4 and model.config.image_token_id not in new.tolist()


def test_decoding_does_not_raise_over_a_generated_image_token(prefers_image_token):
    # A checkpoint from before the suppression (or a user's own generation config) may still produce the token: the
    # decode step then sees an image token without pixel_values and must carry on, as LLaVA does.
    import copy

    model, processor = prefers_image_token
    config = copy.deepcopy(model.generation_config)
    config.update(suppress_tokens=[], max_new_tokens=3, do_sample=False)  # (None would fall back to the model's)
    x = prompt_inputs(processor)
    new = model.generate(**x, generation_config=config)[0, x["input_ids"].shape[1] :]
    assert new.tolist() == [model.config.image_token_id] * 3


def test_continuing_from_a_cache_that_holds_the_images_needs_no_new_features(variant):
    # Multi-turn reuse of a cache: the images were merged at prefill; pixel_values passed again must not be matched
    # against the new tokens, which hold no image placeholder.
    model, processor = variant
    x = prompt_inputs(processor)
    ids, n = x["input_ids"], x["input_ids"].shape[1] - 3
    with torch.no_grad():
        full = model(**x).logits[:, -1]
        prefix = model(input_ids=ids[:, :n], pixel_values=x["pixel_values"], use_cache=True)
        rest = model(input_ids=ids[:, n:], pixel_values=x["pixel_values"], cache=prefix.cache).logits[:, -1]
    torch.testing.assert_close(rest, full, atol=1e-4, rtol=1e-4)


def test_get_image_features_returns_an_output_with_the_projected_features(variant):
    model, processor = variant
    x = prompt_inputs(processor, images=[shape_image("red"), shape_image("green")])
    with torch.no_grad():
        out = model.get_image_features(pixel_values=x["pixel_values"])
        as_tuple = model.get_image_features(pixel_values=x["pixel_values"], return_dict=False)
        tower = model.model.vision_tower(x["pixel_values"], output_hidden_states=True)
    assert isinstance(out, BaseModelOutputWithPooling) and isinstance(as_tuple, tuple)
    hidden = model.config.text_config.hidden_size
    assert [f.shape for f in out.pooler_output] == [(model.config.num_image_tokens, hidden)] * 2
    torch.testing.assert_close(out.last_hidden_state, tower.hidden_states[-1])  # LLaVA's features: no post-norm
    # and they are what the LM receives: placing them by hand gives the forward's logits
    with torch.no_grad():
        embeds = model.get_input_embeddings()(x["input_ids"])
        mask = (x["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, torch.cat(out.pooler_output))
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(**x).logits)


def test_every_parameter_gets_a_gradient_when_everything_trains(variant):
    # DDP with find_unused_parameters=False fails on any trainable parameter that gets none (see the 2-rank test).
    model, processor = variant
    trained = copy_for_training(model)
    x = prompt_inputs(processor)
    trained(**x, labels=x["input_ids"]).loss.backward()
    assert [n for n, p in trained.named_parameters() if p.grad is None] == []


def copy_for_training(model):
    import copy

    trained = copy.deepcopy(model).train()
    trained.requires_grad_(True)
    return trained


def test_lm_head_has_llavas_tensor_parallel_plan(tiny, untied_bases):
    from qwen_siglip.llava import to_llava

    for model in (tiny[0], build_tiny(untied_bases, spread=False)[0]):
        assert model.tp_plan["lm_head"] == "colwise_gather_output"
        assert model.tp_plan == to_llava(model).tp_plan


def test_vision_feature_layer_list_concatenates_the_layers_features(tiny_bases):
    model, processor = build_tiny(tiny_bases, vision_feature_layer=[0, -1], pixel_shuffle_factor=2)
    vision = model.config.vision_config.hidden_size
    assert model.model.multi_modal_projector.linear_1.in_features == vision * 2 * 4
    x = prompt_inputs(processor)
    with torch.no_grad():
        states = model.model.vision_tower(x["pixel_values"], output_hidden_states=True).hidden_states
        expected = model.model.multi_modal_projector(pixel_shuffle(torch.cat([states[0], states[-1]], -1), 2))
        out = model.get_image_features(pixel_values=x["pixel_values"]).pooler_output
    torch.testing.assert_close(torch.stack(out), expected)
    assert model(**x).logits.isfinite().all()


@pytest.mark.parametrize("layers", [[], [0, 3], 5, [-4]])
def test_vision_feature_layer_outside_the_tower_is_rejected(tiny_bases, layers):
    # The tiny tower has 2 layers: hidden_states are indices -3..2.
    with pytest.raises(ValueError, match=r"vision_feature_layer .*\(valid: -3\.\.2\)"):
        build_tiny(tiny_bases, spread=False, vision_feature_layer=layers)


def test_no_deprecation_warning_in_generation_or_training(tiny_bases):
    import warnings

    model, processor = build_tiny(tiny_bases, spread=False)
    x = prompt_inputs(processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(**x, max_new_tokens=3)
        model.train()
        model.activation_checkpointing_enable()
        model(**x, labels=x["input_ids"]).loss.backward()
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecations == []


# ----------------------------------------------------------------------------- bad input, refused clearly


def test_prompt_past_the_context_is_refused(tiny):
    model, processor = tiny
    context = model.config.text_config.max_position_embeddings
    ids = torch.full((1, context + 1), processor.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    with pytest.raises(ValueError, match=f"past the LM's context of {context} tokens"):
        model.generate(input_ids=ids, max_new_tokens=2)


def test_generation_running_past_the_context_is_stopped_with_the_reason(tiny):
    model, processor = tiny
    context = model.config.text_config.max_position_embeddings
    ids = torch.full((1, context - 2), processor.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8)


def test_integer_pixel_values_are_refused(tiny):
    model, processor = tiny
    x = prompt_inputs(processor)
    raw = torch.randint(0, 256, x["pixel_values"].shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match="torch.uint8: raw integer pixels, the processor was skipped"):
        model(input_ids=x["input_ids"], pixel_values=raw)


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_input_ids_outside_the_vocabulary_are_refused(tiny, bad):
    model, processor = tiny
    x = prompt_inputs(processor)
    vocab = model.config.text_config.vocab_size
    ids = x["input_ids"].clone()
    ids[0, 2] = vocab if bad == "vocab" else bad
    with pytest.raises(ValueError, match=rf"id {ids[0, 2]} at position \(0, 2\), outside the LM's vocabulary"):
        model(input_ids=ids, pixel_values=x["pixel_values"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixel_values_are_refused(tiny, bad):
    model, processor = tiny
    x = prompt_inputs(processor)
    pixels = x["pixel_values"].clone()
    pixels[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="pixel_values hold NaN or infinite values"):
        model(input_ids=x["input_ids"], pixel_values=pixels)


def with_rope(model, rope: dict):
    """A model of `model`'s shape whose LM scales its rope as `rope` says (random weights: only shapes matter)."""
    from modeling_qwen_siglip import QwenSiglipForConditionalGeneration

    config = model.config.to_dict()
    config["text_config"]["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    return QwenSiglipForConditionalGeneration(type(model.config)(**config)).eval()


@pytest.mark.parametrize(
    "rope, context",
    [
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, 4096),
        ({"rope_type": "linear", "factor": 2.0}, 2048),
        ({"rope_type": "default"}, 1024),
    ],
    ids=["yarn-x4", "linear-x2", "none"],
)
def test_the_context_guard_counts_rope_scaling_as_transformers_does(tiny, rope, context):
    model, processor = tiny
    assert model.config.text_config.max_position_embeddings == 1024
    scaled = with_rope(model, rope)
    assert scaled.config.context_length == context
    token = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        if context > 1024:  # a 1,536-token forward fits a scaled rope's context
            assert scaled(input_ids=torch.full((1, 1536), token)).logits.shape[1] == 1536
        with pytest.raises(ValueError, match=f"past the LM's context of {context} tokens"):
            scaled(input_ids=torch.full((1, context + 1), token))


def test_get_image_features_honours_output_hidden_states_and_output_attentions(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    pixels = prompt_inputs(processor)["pixel_values"]
    layers = model.config.vision_config.num_hidden_layers
    with torch.no_grad():
        plain = model.get_image_features(pixel_values=pixels)
        full = model.get_image_features(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    assert plain.hidden_states is None and plain.attentions is None  # as SigLIP's own default
    assert len(full.hidden_states) == layers + 1 and len(full.attentions) == layers
    patches = model.config.grid_size**2
    assert full.attentions[0].shape == (1, model.config.vision_config.num_attention_heads, patches, patches)
    torch.testing.assert_close(torch.stack(full.pooler_output), torch.stack(plain.pooler_output))
