"""The GGUF export, checked in the real runtime: llama.cpp as llama-cpp-python builds it from PyPI.

What is compared with what: llama.cpp's tokens with our tokenizer's (tiny BPE and Qwen's real one), its logits and
image embeddings with our model's, and its greedy answers (stock `MTMDChatHandler` and llama-cpp-python's
OpenAI-compatible server, nothing custom) with our `generate` on the trained quickstart checkpoint's held-out
questions. The agreement figures print with `-s`; the README quotes them with this command:

    HF_HUB_OFFLINE=1 python -m pytest tests/test_gguf.py -k agreement -s -p no:cacheprovider
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny, shape_image, user_turn
from gguf_runtime import (
    chat_answer,
    image_embeddings,
    llama,
    llama_cpp_server,
    openai_messages,
    our_image_features,
)
from PIL import Image

import export_gguf
from qwen_siglip import gguf_export
from qwen_siglip.gguf_export import check_exportable, export, write_gguf
from qwen_siglip.gguf_text import MEDIA_MARKER

N_QUESTIONS = 100
MAX_NEW_TOKENS = 16  # every held-out answer is a word or two; a runaway answer would show as a mismatch
TEXTS = {
    "english": "What colour is the shape? Two red squares, left and right.",
    "chinese": "这个形状是什么颜色？左边有两个红色的正方形。",
    "special": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|vision_start|><|image_pad|><|vision_end|>",
    "spacing": "a\n\nb  c\t d \n 3.14 1,000 don't",
}


# ----------------------------------------------------------------------------- fixtures


def save(model, processor, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory) -> dict:
    """The tiny checkpoint exported as f32, f16 and q8_0 (through the command)."""
    out = tmp_path_factory.mktemp("gguf") / "tiny"
    return export_gguf.main(["--model", str(tiny_checkpoint), "--output", str(out), "--outtype", "f32", "f16", "q8_0"])


@pytest.fixture(scope="module")
def exported(tiny, qwen_tiny, tmp_path_factory) -> dict:
    """{"tiny"/"qwen_tiny": (model, processor, f16 files)}: the two tiny models written in memory, once."""
    out = tmp_path_factory.mktemp("gguf")
    return {name: (*pair, write_gguf(*pair, out / name, ["f16"], "t")) for name, pair in
            (("tiny", tiny), ("qwen_tiny", qwen_tiny))}  # fmt: skip


@pytest.fixture(scope="module")
def trained(quickstart_run, tmp_path_factory) -> dict:
    """The trained quickstart checkpoint: model, processor, its f32/f16/q8_0 GGUF files, its held-out data."""
    from qwen_siglip.data import load_vlm_dataset

    checkpoint = quickstart_run["checkpoint"]
    files = export(checkpoint, tmp_path_factory.mktemp("gguf") / "trained", ["f32", "f16", "q8_0"])
    model, processor = gguf_export.load(checkpoint)
    examples = load_vlm_dataset(str(checkpoint.parent / "data" / "sft_test.jsonl"))
    return {"model": model, "processor": processor, "files": files,
            "examples": [examples[i] for i in range(min(N_QUESTIONS, len(examples)))]}  # fmt: skip


@pytest.fixture(scope="module")
def held_out(trained) -> tuple[list, list[str]]:
    """(chats, our greedy answers) for the held-out questions: (prompt messages, images) each."""
    chats = questions(trained["examples"])
    return chats, greedy_answers(trained["model"], trained["processor"], chats)


def questions(examples) -> list[tuple[list[dict], list]]:
    """(prompt messages, images) of each held-out example: everything before its last answer."""
    from qwen_siglip.evaluation import split_example

    return [(split_example(e)[0], e["images"]) for e in examples]


def greedy_answers(model, processor, chats: list[tuple[list[dict], list]]) -> list[str]:
    """Our model's greedy answers (`generate`, its generation config: <|image_pad|> suppressed)."""
    answers = []
    for messages, images in chats:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        x = processor(images=images, text=text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(processor.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def agreement(a: list[str], b: list[str]) -> float:
    assert len(a) == len(b) and a
    return sum(x == y for x, y in zip(a, b)) / len(a)


# ----------------------------------------------------------------------------- the export


def test_export_writes_the_lm_the_mmproj_and_a_card_naming_them(tiny_gguf, tiny_checkpoint):
    import gguf

    names, stem = {k: p.name for k, p in tiny_gguf.items()}, tiny_checkpoint.name  # named after the checkpoint
    assert names == {"mmproj": f"mmproj-{stem}-F16.gguf", "f32": f"{stem}-F32.gguf", "f16": f"{stem}-F16.gguf",
                     "q8_0": f"{stem}-Q8_0.gguf"}  # fmt: skip
    card = (tiny_gguf["f16"].parent / "README.md").read_text()
    assert all(name in card for name in names.values())
    assert sorted(p.name for p in tiny_gguf["f16"].parent.iterdir()) == sorted([*names.values(), "README.md"])
    lm, mmproj = gguf.GGUFReader(tiny_gguf["q8_0"]), gguf.GGUFReader(tiny_gguf["mmproj"])
    assert lm.fields["general.architecture"].contents() == "qwen2"
    assert lm.fields["general.file_type"].contents() == 7  # llama.cpp's quantiser wrote it: MOSTLY_Q8_0
    assert lm.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert mmproj.fields["clip.projector_type"].contents() == "mlp"
    assert mmproj.fields["clip.use_gelu"].contents() is True  # SigLIP's tanh-GELU, not llama.cpp's quick GELU


def test_export_refuses_a_folder_that_is_not_empty(tiny_checkpoint, tmp_path):
    (tmp_path / "old.gguf").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export(tiny_checkpoint, tmp_path)


def test_pixel_shuffle_is_refused_before_any_weight_loads(tiny_bases, tmp_path, monkeypatch):
    from modeling_qwen_siglip import QwenSiglipForConditionalGeneration

    folder = save(*build_tiny(tiny_bases, pixel_shuffle_factor=2), tmp_path / "ps2")
    monkeypatch.setattr(QwenSiglipForConditionalGeneration, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="pixel_shuffle_factor=1") as refused:
        export(folder, tmp_path / "out")
    assert "idefics3" in str(refused.value) and "lfm2" in str(refused.value)  # says why llama.cpp's do not fit
    assert not (tmp_path / "out").exists()


def refused_configs():
    """(name, change to a copy of the tiny config/processor, words the error must hold)."""

    def rope(c, p):
        c.text_config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}

    def act(c, p):
        c.projector_hidden_act = "relu"

    def twice(c, p):
        c.vision_feature_layer = [-1, 2]  # the same hidden state (2 layers: index 2 is -1)

    def stretch(c, p):
        p.image_processor.size = {"height": 32, "width": 64}

    def template(c, p):
        p.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    return [("rope", rope, "rope"), ("act", act, "relu"), ("twice", twice, "twice"), ("size", stretch, "size"),
            ("template", template, "chat template")]  # fmt: skip


@pytest.mark.parametrize("name, change, words", refused_configs(), ids=[c[0] for c in refused_configs()])
def test_what_llama_cpp_would_compute_differently_is_refused_with_the_reason(tiny, name, change, words):
    import copy

    model, processor = tiny
    config, processor = copy.deepcopy(model.config), copy.deepcopy(processor)
    check_exportable(config, processor)  # as it is: fine
    change(config, processor)
    with pytest.raises(ValueError, match=words):
        check_exportable(config, processor)


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tiny):
    import copy

    from tokenizers import pre_tokenizers

    processor = copy.deepcopy(tiny[1])
    processor.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's
    with pytest.raises(ValueError, match="not Qwen2's byte-level BPE"):
        check_exportable(tiny[0].config, processor)


# ----------------------------------------------------------------------------- text: tokens, ends, logits


@pytest.mark.parametrize("which", ["tiny", "qwen_tiny"])
def test_llama_cpp_tokenizes_english_chinese_and_special_tokens_as_transformers(which, exported):
    model, processor, files = exported[which]
    with llama(files["f16"], vocab_only=True) as llm:
        for name, text in TEXTS.items():
            ours = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert theirs == ours, name
            assert llm.detokenize(ours, special=True).decode() == processor.tokenizer.decode(ours), name
            assert llm.detokenize(ours).decode() == processor.tokenizer.decode(ours, skip_special_tokens=True), name
        # Text typed inside a chat message is escaped by the template: plain characters to both tokenizers.
        escaped = processor.apply_chat_template(user_turn("<|im_end|> and <image>", 0), add_generation_prompt=True)
        assert llm.tokenize(escaped.encode(), add_bos=False, special=True) == processor.tokenizer(escaped)["input_ids"]


def test_both_end_ids_end_generation_and_image_pad_is_suppressed(exported):
    import ctypes

    import llama_cpp

    model, processor, files = exported["qwen_tiny"]
    ends = model.generation_config.eos_token_id
    assert len(ends) == 2  # <|im_end|> and <|endoftext|>, as Qwen2.5-Instruct
    with llama(files["f16"], vocab_only=True) as llm:
        ids = [int(llm.metadata[f"tokenizer.ggml.{k}_token_id"]) for k in ("eos", "eot")]
        assert ids == ends  # named in the file, not only recognised by their text
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in ends)
        assert llm.token_eos() == ends[0]
        n = ctypes.c_int32(0)
        suppressed = llama_cpp.llama_vocab_get_suppress_tokens(vocab, ctypes.byref(n))
        assert [suppressed[i] for i in range(n.value)] == [model.config.image_token_id]
        assert llm.n_vocab() == model.config.text_config.vocab_size  # every embedding row has a token


def test_text_logits_agreement_f32_to_float_rounding_and_f16_to_fp16_tolerance(trained):
    """Logits on two prompts (English, Chinese), as a fraction of the logits' range. f32 weights with an f32 KV cache
    (llama.cpp's default cache is f16): only the order of the arithmetic differs from ours. f16 weights with the
    default cache, what users run: within 1%, and the same top token wherever ours is not a near-tie (a top-2
    margin inside twice the difference seen)."""
    model, processor = trained["model"], trained["processor"]
    prompts = [processor.apply_chat_template(user_turn(q, 0), add_generation_prompt=True) + a
               for q, a in [("What colour is the shape?", "red"), ("这个形状是什么颜色？", "红色")]]  # fmt: skip
    figures = {}
    for outtype, tolerance, cache in (("f32", 1e-5, {"type_k": 0, "type_v": 0}), ("f16", 1e-2, {})):
        with llama(trained["files"][outtype], logits_all=True, **cache) as llm:
            for prompt in prompts:
                ids = processor.tokenizer(prompt)["input_ids"]
                llm.reset()
                llm.eval(ids)
                theirs = np.array(llm.scores[: len(ids)])
                with torch.no_grad():
                    ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
                diff, scale = np.abs(theirs - ours).max(), np.abs(ours).max()
                figures[outtype] = max(figures.get(outtype, 0.0), float(diff / scale))
                assert diff <= tolerance * scale, (outtype, diff, scale)
                top2 = np.sort(ours, axis=-1)[:, -2:]
                decided = top2[:, 1] - top2[:, 0] > 2 * diff
                assert decided.mean() > 0.8 and (theirs.argmax(-1) == ours.argmax(-1))[decided].all(), outtype
    print(f"\nGGUF text logits, max |llama.cpp - transformers| / logits range: {json.dumps(figures)}")


# ----------------------------------------------------------------------------- images


def letterboxed(image: Image.Image, size: int) -> Image.Image:
    """What llama.cpp's `mlp` preprocessing makes of a non-square image: the longer side scaled to `size` (bicubic,
    the shorter side rounded up), centred on a (122, 116, 104) grey square."""
    import math

    scale = min(size / image.width, size / image.height)
    w, h = (min(size, math.ceil(side * scale)) for side in image.size)
    canvas = Image.new("RGB", (size, size), (122, 116, 104))
    canvas.paste(image.resize((w, h), Image.Resampling.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return canvas


def assert_embeddings_close(theirs: np.ndarray, ours: np.ndarray, tolerance: float = 1e-2) -> float:
    """Max |difference| within `tolerance` of our embeddings' range; returns it as a fraction of that range."""
    assert theirs.shape == ours.shape
    relative = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    assert relative <= tolerance, relative
    return relative


def test_mmproj_image_embeddings_agreement_with_our_projector(trained):
    """The f16 mmproj's image embeddings (tower, feature layer, projector) against ours, within 1% of their range:
    held-out images at the tower's size, and a larger square one both sides resize (Pillow's bicubic, both)."""
    model, processor, files = trained["model"], trained["processor"], trained["files"]
    size = model.config.vision_config.image_size
    images = [e["images"][0] for e in trained["examples"][:8]] + [shape_image("blue", size=3 * size)]
    with llama(files["f16"]) as llm:
        pairs = [(image_embeddings(llm, files["mmproj"], i), our_image_features(model, processor, i)) for i in images]
    worst = max(assert_embeddings_close(theirs, ours) for theirs, ours in pairs)
    print(f"\nGGUF image embeddings, max |llama.cpp - ours| / range, {len(images)} images: {worst:.2e}")


@pytest.mark.parametrize("layers", [-1, -2, [-1, 0], [0, -1]], ids=["last", "second-last", "unsorted", "ascending"])
def test_mmproj_takes_our_vision_feature_layers(tiny_bases, layers, tmp_path):
    """Without `clip.vision.feature_layer` llama.cpp would read the second-to-last layer (our default is the last);
    with several layers it concatenates them in ascending order, so a list in another order gets its projector
    columns permuted."""
    torch.manual_seed(0)
    model, processor = build_tiny(tiny_bases, vision_feature_layer=layers)
    files = write_gguf(model, processor, tmp_path, ["f16"], "t")
    image = shape_image("green", size=32)
    with llama(files["f16"]) as llm:
        assert_embeddings_close(image_embeddings(llm, files["mmproj"], image),
                                our_image_features(model, processor, image))  # fmt: skip


def test_llama_cpp_letterboxes_a_non_square_image_where_we_stretch_it(trained):
    """The README's caveat, as a specification of llama.cpp's preprocessing: for a 2:1 image it computes what our
    model computes on the letterboxed square, not on our stretched one."""
    model, processor, files = trained["model"], trained["processor"], trained["files"]
    size = model.config.vision_config.image_size
    wide = trained["examples"][1]["images"][0].resize((2 * size, size), Image.Resampling.BICUBIC)
    with llama(files["f16"]) as llm:
        theirs = image_embeddings(llm, files["mmproj"], wide)
    assert_embeddings_close(theirs, our_image_features(model, processor, letterboxed(wide, size)))
    stretched = our_image_features(model, processor, wide)
    assert np.abs(theirs - stretched).max() > 0.1 * np.abs(stretched).max()


# ----------------------------------------------------------------------------- chat: prompt tokens and answers


def test_stock_chat_handler_feeds_llama_cpp_our_prompt_tokens(tiny, tiny_gguf):
    """The stock MTMDChatHandler renders the GGUF's template with each image as a text marker; the wrapper tokens
    come from the template, so the sequence is ours token for token, each image in its <|image_pad|> run."""
    model, processor = tiny
    system = [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]}]
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                               {"type": "image"}, {"type": "text", "text": "这两个？"}]}]  # fmt: skip
    earlier_turn = [*user_turn("What colour?"), {"role": "assistant", "content": "red"}, *user_turn("<|im_end|>?", 0)]
    for chat, n_images in ((user_turn("What colour?"), 1), (system + user_turn("Shape?"), 1), (two_images, 2),
                           (earlier_turn, 1)):  # fmt: skip
        images = [shape_image(c) for c in ("red", "blue")[:n_images]]
        ours = processor(images=images, text=processor.apply_chat_template(chat, add_generation_prompt=True))
        ours = np.array(ours["input_ids"][0])
        with llama(tiny_gguf["f16"], tiny_gguf["mmproj"]) as llm:
            chat_answer(llm, chat, images, max_tokens=1)
            theirs = np.array(llm.input_ids[: llm.n_tokens])
        text = ours != model.config.image_token_id
        assert len(theirs) == len(ours) and (theirs[text] == ours[text]).all()
        assert MEDIA_MARKER not in processor.tokenizer.decode(theirs[text])


@pytest.mark.parametrize("marker", ["<__media__>", "<__media_Ab3xYz__>"], ids=["mtmd", "llama-server"])
def test_gguf_template_wraps_each_media_marker_in_string_content(tiny, marker):
    """llama-server joins a message with images into one string holding its marker, `<__media_<random>__>`
    (llama-mtmd-cli: `<__media__>` before the prompt); the template wraps each one, and renders our prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from processing_qwen_siglip import IMAGE_PLACEHOLDER, VISION_END, VISION_START
    from qwen_siglip.gguf_text import gguf_chat_template

    _, processor = tiny
    template = ImmutableSandboxedEnvironment().from_string(gguf_chat_template(processor.chat_template))
    text = f"A{marker}B <|im_end|>{marker}"
    joined = [{"role": "system", "content": "One word."}, {"role": "user", "content": text}]
    typed = [{"role": "system", "content": [{"type": "text", "text": "One word."}]},
             {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"},
                                          {"type": "text", "text": "B <|im_end|>"}, {"type": "image"}]}]  # fmt: skip
    ours = processor.apply_chat_template(typed, add_generation_prompt=True)
    wrapped = ours.replace(IMAGE_PLACEHOLDER, VISION_START + marker + VISION_END)
    assert template.render(messages=joined, add_generation_prompt=True) == wrapped
    unclosed = [{"role": "user", "content": "a <__media b"}]  # no marker: left as it is
    assert "<__media b<|im_end|>" in template.render(messages=unclosed, add_generation_prompt=True)


def test_greedy_answers_agreement_with_transformers_on_held_out_questions(trained, held_out):
    """>= 99% of 100 held-out questions answered exactly as our greedy `generate` answers them, at f16, through the
    stock chat handler; q8_0's figure is printed beside it (and must stay useful)."""
    chats, ours = held_out
    assert len(set(ours)) > 3  # varied answers, so agreement is not a coincidence
    figures = {}
    for outtype in ("f16", "q8_0"):
        with llama(trained["files"][outtype], trained["files"]["mmproj"]) as llm:
            theirs = [chat_answer(llm, m, i, MAX_NEW_TOKENS) for m, i in chats]
        figures[outtype] = agreement(theirs, ours)
    print(f"\nGGUF greedy agreement with transformers, {len(chats)} held-out questions: {json.dumps(figures)}")
    assert figures["f16"] >= 0.99
    assert figures["q8_0"] >= 0.9


def test_non_square_agreement_measured_separately(trained, held_out):
    """The same questions on 2:1 images: llama.cpp answers as our model does on the letterboxed image (its
    preprocessing), and as on the stretched one (ours) once the client makes the image square first."""
    model, processor, files = trained["model"], trained["processor"], trained["files"]
    size = model.config.vision_config.image_size
    wide = [(m, [i.resize((2 * size, size), Image.Resampling.BICUBIC) for i in imgs]) for m, imgs in held_out[0]]
    boxed = [(m, [letterboxed(i, size) for i in imgs]) for m, imgs in wide]
    ours_stretched, ours_letterboxed = greedy_answers(model, processor, wide), greedy_answers(model, processor, boxed)
    with llama(files["f16"], files["mmproj"]) as llm:
        theirs = [chat_answer(llm, m, i, MAX_NEW_TOKENS) for m, i in wide]
        squared = [chat_answer(llm, m, [i.resize((size, size), Image.Resampling.BICUBIC) for i in imgs],
                               MAX_NEW_TOKENS) for m, imgs in wide]  # fmt: skip
    figures = {"raw 2:1 vs ours": agreement(theirs, ours_stretched),
               "raw 2:1 vs ours on the letterboxed image": agreement(theirs, ours_letterboxed),
               "squared by the client vs ours": agreement(squared, ours_stretched)}  # fmt: skip
    print(f"\nGGUF agreement on {len(wide)} held-out questions with 2:1 images: {json.dumps(figures)}")
    assert figures["raw 2:1 vs ours on the letterboxed image"] >= 0.99
    assert figures["squared by the client vs ours"] >= 0.99


def test_server_agreement_openai_client_with_base64_images_answers_as_greedy_generate(trained, held_out, tmp_path):
    """llama-cpp-python's OpenAI-compatible server (`--chat_format mtmd`, stock), asked through the `openai` client
    with base64 PNG images, on the held-out questions."""
    import openai

    chats, ours = held_out
    files = trained["files"]
    with llama_cpp_server(files["f16"], files["mmproj"], tmp_path / "server.log") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        # Greedy: temperature 0 and, since llama-cpp-python's server defaults to a repeat penalty of 1.1, none.
        greedy = dict(temperature=0, max_tokens=MAX_NEW_TOKENS, seed=0, extra_body={"repeat_penalty": 1.0})
        replies = [client.chat.completions.create(model="gguf", messages=openai_messages(m, i), **greedy)
                   for m, i in chats]  # fmt: skip
    figure = agreement([r.choices[0].message.content for r in replies], ours)
    print(f"\nGGUF server agreement with transformers, {len(chats)} held-out questions: {figure:.2%}")
    assert figure >= 0.99


# ----------------------------------------------------------------------------- quantisation and the command


def test_q4_k_m_goes_through_llama_cpps_quantiser_and_runs(tiny, tmp_path):
    import gguf

    model, processor = tiny
    files = write_gguf(model, processor, tmp_path, ["q4_k_m"], "t")
    assert gguf.GGUFReader(files["q4_k_m"]).fields["general.file_type"].contents() == 15  # MOSTLY_Q4_K_M
    assert not list(tmp_path.glob("tmp*"))  # the fp32 intermediate is gone
    with llama(files["q4_k_m"], files["mmproj"]) as llm:
        assert isinstance(chat_answer(llm, user_turn("What colour?"), [shape_image("red")], max_tokens=4), str)


def test_push_uploads_the_gguf_folder_through_the_filtered_upload(tiny_checkpoint, tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(gguf_export, "push_folder", lambda folder, repo, **kw: pushed.append((folder, repo)) or "url")
    out = tmp_path / "gguf"
    export_gguf.main(["--model", str(tiny_checkpoint), "--output", str(out), "--push_to_hub",
                      "--hub_model_id", "user/tiny-GGUF"])  # fmt: skip
    assert pushed == [(out, "user/tiny-GGUF")]
    with pytest.raises(SystemExit):  # no repo named: refused before anything is written
        export_gguf.main(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "x"), "--push_to_hub"])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the benchmark section


def gguf_results(q8_decode: float, q8_ttft: float) -> dict:
    rows = [{"variant": v, "file_mb": 1.0, "ttft_s": 1.0, "decode_tokens_per_s": 1.0, "peak_rss_mb": 1.0,
             "ttft_speedup": 1.0, "decode_speedup": 1.0} for v in ("transformers fp32", "llama.cpp q8_0")]  # fmt: skip
    rows[1] |= {"ttft_speedup": q8_ttft, "decode_speedup": q8_decode}
    check = {"max_abs_diff": 0.0, "logits_range": 1.0, "same_top1": 1.0, "tokens": 3}
    return {"gguf": {"rows": rows, "f16_check": check, "threads": 2, "prompt_tokens": 9, "new_tokens": 4}}


def test_bench_section_reads_the_issues_goals_for_q8_0():
    from bench import report

    met = {t["target"]: t["met"] for t in report.targets(gguf_results(q8_decode=3.2, q8_ttft=1.9))}
    assert met == {"llama.cpp q8_0: decode tokens/s vs transformers fp32": True,
                   "llama.cpp q8_0: time to first token vs transformers fp32": False}  # fmt: skip
    table = "\n".join(report.gguf_table(gguf_results(3.2, 1.9)["gguf"], {"gen_repeats": 3}))
    assert "| llama.cpp q8_0 | 1 | 1.00 | 1.90x | 1 | 3.20x | 1 |" in table


@pytest.mark.slow
def test_bench_gguf_section_runs_at_full_size_and_writes_its_table(tmp_path):
    """`python -m bench --sections gguf --quick`: the full-size architecture exported, every runtime timed."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "gguf.json"
    cmd = [sys.executable, "-m", "bench", "--sections", "gguf", "--quick", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())["gguf"]
    assert [r["variant"] for r in result["rows"]] == ["transformers fp32", "llama.cpp f16", "llama.cpp q8_0",
                                                      "llama.cpp q4_k_m"]  # fmt: skip
    assert result["f16_check"]["same_top1"] >= 0.9  # random weights: near-flat logits, a near-tie may flip
    assert "| llama.cpp q8_0 |" in run.stdout
