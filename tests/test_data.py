"""The data modules (records, sources, images, data): every supported format becomes TRL conversational examples;
bad records are skipped and counted.

Every image and data file is built here, in tmp_path; the Hub path is exercised through a monkeypatched
`datasets.load_dataset`.
"""

import io
import json
import logging
import os
import pickle
import re
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image, ImageFile

from qwen_siglip import images
from qwen_siglip.data import NoUsableRecords, load_vlm_dataset, require_usable
from qwen_siglip.records import CAPTION_PROMPTS, split_placeholders

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def make_image(path: Path, color=RED, size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def png_bytes(color=RED, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def llava(image="img/a.png", human="<image>\nWhat is this?", gpt="A red square.") -> dict:
    rec = {"id": "0", "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
    if image is not None:
        rec["image"] = image
    return rec


def user(*content) -> dict:
    return {"role": "user", "content": list(content)}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def assistant_str(text: str) -> dict:
    return {"role": "assistant", "content": text}


IMG, TXT = {"type": "image"}, lambda text: {"type": "text", "text": text}  # noqa: E731


def colors(example: dict) -> list[tuple]:
    """The top-left pixel of each image: identifies which file became which image."""
    return [im.getpixel((0, 0)) for im in example["images"]]


# ----------------------------------------------------------------------------- formats


def test_placeholders_split_into_typed_content_keeping_other_text_exactly():
    assert split_placeholders("<image>\nWhat is this?") == [IMG, TXT("What is this?")]
    assert split_placeholders("Compare <image> and <image>.") == [TXT("Compare "), IMG, TXT(" and "), IMG, TXT(".")]
    assert split_placeholders("Look:\n<image>\n\n  Why?") == [TXT("Look:\n"), IMG, TXT("\n  Why?")]
    assert split_placeholders("no image here\n") == [TXT("no image here\n")]


def test_llava_record_becomes_trl_messages(tmp_path):
    make_image(tmp_path / "img/a.png", RED, size=(10, 7))
    rec = llava(human="<image>\nWhat is this?", gpt="A red square.")
    rec["conversations"].insert(0, {"from": "system", "value": "You are helpful."})
    rec["conversations"] += [{"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]
    ds = load_vlm_dataset(str(write_json(tmp_path / "pretrain.json", [rec])))
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 1
    ex = ds[0]
    assert ex["messages"] == [
        {"role": "system", "content": [TXT("You are helpful.")]},
        user(IMG, TXT("What is this?")),
        assistant("A red square."),
        user(TXT("Sure?")),
        assistant("Yes."),
    ]
    assert [(im.mode, im.size) for im in ex["images"]] == [("RGB", (10, 7))]
    assert colors(ex) == [RED]


def test_llava_image_without_placeholder_is_prepended_to_first_user_turn(tmp_path):
    make_image(tmp_path / "img/a.png")
    ds = load_vlm_dataset(str(write_json(tmp_path / "d.json", [llava(human="Describe the picture.")])))
    assert ds[0]["messages"][0] == user(IMG, TXT("Describe the picture."))
    assert len(ds[0]["images"]) == 1


def test_llava_text_only_record_has_no_images_and_chinese_text_is_kept(tmp_path):
    rec = llava(image=None, human="你好，介绍一下你自己。", gpt="我是一个视觉语言模型。")
    ds = load_vlm_dataset(str(write_json(tmp_path / "linksoul.json", [rec])))
    assert ds[0] == {
        "messages": [user(TXT("你好，介绍一下你自己。")), assistant("我是一个视觉语言模型。")],
        "images": [],
    }


def test_minimind_multi_image_comma_string(tmp_path):
    make_image(tmp_path / "a.png", RED)
    make_image(tmp_path / "b.png", BLUE)
    turns = [{"role": "user", "content": "Left <image>, right <image>: which is red?"}, assistant_str("The left.")]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": turns, "image": "a.png, b.png"}])
    ex = load_vlm_dataset(str(path))[0]
    assert ex["messages"][0] == user(TXT("Left "), IMG, TXT(", right "), IMG, TXT(": which is red?"))
    assert colors(ex) == [RED, BLUE]  # order of the string, matched to placeholders in order


def test_minimind_image_list_in_the_middle_of_a_turn(tmp_path):
    make_image(tmp_path / "a.png", GREEN)
    make_image(tmp_path / "b.png", RED)
    turns = [{"role": "user", "content": "描述<image>和<image>"}, assistant_str("绿色和红色。")]
    ex = load_vlm_dataset(
        str(write_jsonl(tmp_path / "m.jsonl", [{"conversations": turns, "image": ["a.png", "b.png"]}]))
    )[0]
    assert ex["messages"][0] == user(TXT("描述"), IMG, TXT("和"), IMG)
    assert colors(ex) == [GREEN, RED]


def test_trl_messages_with_typed_or_string_content(tmp_path):
    make_image(tmp_path / "a.png", RED)
    typed = {"messages": [user(IMG, TXT("Colour?")), assistant("Red.")], "images": ["a.png"]}
    string = {"messages": [{"role": "user", "content": "<image>Colour?"}, assistant_str("Red.")], "images": ["a.png"]}
    ds = load_vlm_dataset(str(write_jsonl(tmp_path / "trl.jsonl", [typed, string])))
    assert ds[0]["messages"] == ds[1]["messages"] == [user(IMG, TXT("Colour?")), assistant("Red.")]
    assert colors(ds[1]) == [RED]


def test_parquet_inline_bytes(tmp_path):
    """HF's Image feature stores {"bytes", "path"}; the images are never decoded by datasets itself."""
    rows = {
        "messages": [[user(IMG, TXT("Which colour?")), assistant("Green.")]] * 2,
        "images": [[{"bytes": png_bytes(GREEN), "path": None}], [{"bytes": png_bytes(BLUE), "path": "x.png"}]],
    }
    features = datasets.Features(
        {
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
            "images": datasets.List(datasets.Image()),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    llava_rows = {"conversations": [llava()["conversations"]], "image": [png_bytes(RED)]}  # a plain bytes column
    datasets.Dataset.from_dict(llava_rows).to_parquet(str(tmp_path / "llava.parquet"))

    ds = load_vlm_dataset(str(tmp_path))  # a folder: both files, in name order
    assert len(ds) == 3 and not ds.skipped
    assert [colors(ds[i]) for i in range(3)] == [[RED], [GREEN], [BLUE]]
    assert ds[1]["messages"] == [user(IMG, TXT("Which colour?")), assistant("Green.")]  # arrow's "text": None dropped


def test_caption_list_becomes_qa(tmp_path):
    """One example per record (not per caption); prompt and caption picked from the record index."""
    make_image(tmp_path / "x.png", RED)
    make_image(tmp_path / "y.png", BLUE)
    records = [
        {"image_id": "x.png", "caption": ["一只红色的方块。", "红色的图片。"]},
        {"image_id": "y.png", "caption": ["A blue picture.", "Something blue."]},
    ]
    path = str(write_json(tmp_path / "caption_train_annotations.json", records))
    ds = load_vlm_dataset(path)
    assert len(ds) == 2
    zh, en = ds[0]["messages"], ds[1]["messages"]
    assert zh[0]["content"][0] == IMG and zh[0]["content"][1]["text"] in CAPTION_PROMPTS["zh"]
    assert zh[1] == assistant("一只红色的方块。")
    assert en[0]["content"][1]["text"] in CAPTION_PROMPTS["en"] and en[1] == assistant("Something blue.")
    assert colors(ds[1]) == [BLUE]
    assert load_vlm_dataset(path)[1]["messages"] == en  # reproducible across loads


def test_benchmark_question_answer_records_become_qa(tmp_path):
    """POPE/MME-style {question, answer} parquet; TextVQA/VQAv2-style {question, answers} (the majority answer)."""
    pope = [
        {"question": "Is there a red square in the image?", "answer": "yes", "image": {"bytes": png_bytes(RED)}},
        {"question": "Is there a dog?", "answer": "", "image": {"bytes": png_bytes(RED)}},
    ]
    datasets.Dataset.from_list(pope).to_parquet(tmp_path / "pope.parquet")
    ds = load_vlm_dataset(str(tmp_path / "pope.parquet"))
    assert len(ds) == 1 and ds.skipped["empty_turn"] == 1
    assert ds[0]["messages"] == [user(IMG, TXT("Is there a red square in the image?")), assistant("yes")]
    make_image(tmp_path / "b.png", BLUE)
    vqa = [
        {"question": "<image>\nWhat colour?", "answers": ["blue", "navy", "blue"], "image": "b.png"},
        {"question": "Colour?", "answers": [{"answer": a} for a in ("navy", "blue", "navy")], "image": "b.png"},
        {"question": "Colour?", "answers": {"answer": ["teal"]}, "image": "b.png"},  # HF's list-of-struct layout
    ]
    ds = load_vlm_dataset(str(write_jsonl(tmp_path / "vqa.jsonl", vqa)))
    assert ds[0]["messages"] == [user(IMG, TXT("What colour?")), assistant("blue")] and colors(ds[0]) == [BLUE]
    assert [ds[i]["messages"][1] for i in (1, 2)] == [assistant("navy"), assistant("teal")]


def test_hub_dataset_id_goes_through_load_dataset(tmp_path, monkeypatch):
    rows = [{"messages": [user(IMG, TXT("Colour?")), assistant("Blue.")], "images": [Image.new("RGB", (5, 5), BLUE)]}]
    hub = datasets.Dataset.from_list(rows)
    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return hub.to_iterable_dataset() if streaming else hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_vlm_dataset("someone/vlm-set", split="validation")
    streamed = list(load_vlm_dataset("someone/vlm-set", streaming=True))
    assert calls == [("someone/vlm-set", "validation", False), ("someone/vlm-set", "train", True)]
    for ex in (ds[0], streamed[0]):
        assert ex["messages"][1] == assistant("Blue.") and colors(ex) == [BLUE]


def test_save_to_disk_folder(tmp_path):
    rows = {"messages": [[user(IMG, TXT("Colour?")), assistant("Red.")]], "images": [[png_bytes(RED)]]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    ds = load_vlm_dataset(str(tmp_path / "saved"), split="test")
    assert len(ds) == 1 and colors(ds[0]) == [RED]


# ----------------------------------------------------------------------------- images


def test_palette_rgba_16bit_cmyk_images_become_rgb(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 is black, and transparent
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    make_image(tmp_path / "rgba.png", (0, 0, 0, 0), mode="RGBA")  # fully transparent black
    make_image(tmp_path / "la.png", (0, 0), mode="LA")
    Image.new("I;16", (4, 4), 40000).save(tmp_path / "i16.png")  # convert("L") would clip this to 255
    make_image(tmp_path / "cmyk.jpg", (0, 255, 255, 0), mode="CMYK")  # red in CMYK
    make_image(tmp_path / "l.png", 77, mode="L")
    make_image(tmp_path / "one.png", 1, mode="1")
    names = ["p.png", "rgba.png", "la.png", "i16.png", "cmyk.jpg", "l.png", "one.png"]
    turns = [{"from": "human", "value": "<image>" * len(names)}, {"from": "gpt", "value": "Seven images."}]
    ex = load_vlm_dataset(str(write_json(tmp_path / "modes.json", [{"conversations": turns, "image": names}])))[0]
    assert all(im.mode == "RGB" for im in ex["images"])
    pixels = colors(ex)
    assert pixels[0] == pixels[1] == pixels[2] == (255, 255, 255)  # transparency composited on white
    assert ex["images"][0].getpixel((1, 1)) == RED  # the opaque palette entry survives
    assert pixels[3] == (155, 155, 155)  # 40000 / 65535 * 255, not clipped to white
    assert pixels[4][0] > 200 and max(pixels[4][1:]) < 60
    assert pixels[5] == (77, 77, 77) and pixels[6] == (255, 255, 255)


def test_image_outside_root_is_rejected(tmp_path):
    root = tmp_path / "root"
    make_image(root / "ok.png")
    secret = make_image(tmp_path / "secret.png")
    (root / "link.png").symlink_to(secret)
    records = [llava(image=p) for p in ["ok.png", "../secret.png", str(secret), "link.png"]]
    ds = load_vlm_dataset(str(write_json(root / "d.json", records)))
    assert len(ds) == 1 and ds.skipped == Counter(image_outside_root=3)
    # an explicit image_root is the boundary, even for a data file that lives elsewhere
    ds = load_vlm_dataset(str(write_json(tmp_path / "d.json", [llava(image="secret.png")])), image_root=str(root))
    assert len(ds) == 0 and ds.skipped == Counter(missing_image=1)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: tests the header check without decoding megapixels."""
    png = bytearray(png_bytes(size=(1, 1)))
    png[16:24] = struct.pack(">II", width, height)  # IHDR data, then its CRC
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_large_photo_is_too_many_pixels_and_only_pils_limit_makes_a_bomb(tmp_path, monkeypatch, caplog):
    make_image(tmp_path / "big.png", size=(20, 20))
    path = str(write_json(tmp_path / "d.json", [llava(image="big.png")]))
    with caplog.at_level(logging.WARNING, logger="qwen_siglip.data"):
        assert load_vlm_dataset(path, max_pixels=399).skipped == Counter(too_many_pixels=1)
    assert "20x20 = 400 pixels, over the cap of 399; raise max_pixels" in caplog.text and "bomb" not in caplog.text
    assert len(load_vlm_dataset(path, max_pixels=400)) == 1
    real_photo, bomb = png_claiming(9000, 9000), png_claiming(10000, 10000)  # headers only: nothing is decoded
    with pytest.raises(images.ImageRefused, match="9000x9000 = 81,000,000 pixels, over the cap of 64,000,000") as e:
        images.load_rgb(real_photo)
    assert e.value.reason == "too_many_pixels"  # a large photo is not an attack: under PIL's 89M-pixel limit
    with pytest.raises(images.ImageRefused, match="over PIL's decompression-bomb limit") as e:
        images.load_rgb(bomb)
    assert e.value.reason == "decompression_bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL's own check warns (and errors above 2x): both count
    assert load_vlm_dataset(path).skipped == Counter(decompression_bomb=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    assert load_vlm_dataset(path).skipped == Counter(decompression_bomb=1)


def test_images_are_decoded_lazily(tmp_path, monkeypatch):
    for i in range(3):
        make_image(tmp_path / f"{i}.png", (i, 0, 0))
    path = write_json(tmp_path / "d.json", [llava(image=f"{i}.png") for i in range(3)])
    decoded = []
    real_load = ImageFile.ImageFile.load
    spy = lambda im: decoded.append(Path(im.filename).name) or real_load(im)  # noqa: E731
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    ds = load_vlm_dataset(str(path))
    assert len(ds) == 3 and decoded == []  # loading read headers only
    assert colors(ds[2]) == [(2, 0, 0)] and set(decoded) == {"2.png"}  # only the one asked for
    assert ds[0]["images"][0] is not ds[0]["images"][0]  # nothing decoded is kept


# ----------------------------------------------------------------------------- bad records


def bad_records(tmp_path: Path) -> Path:
    make_image(tmp_path / "img/a.png")
    (tmp_path / "img/garbage.png").write_bytes(b"not an image at all")
    records = [
        llava(),  # 0 good
        llava(image="img/nope.png"),  # 1 missing_image
        llava(image="img/garbage.png"),  # 2 undecodable_image
        llava(human="<image><image> Compare."),  # 3 placeholder_image_mismatch: 2 placeholders, 1 image
        llava(image=None, human="<image> What?"),  # 4 placeholder_image_mismatch: no image at all
        llava(gpt="   "),  # 5 empty_turn
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hi"}]},  # 6 unknown_role
        {"conversations": [{"from": "human", "value": "<image>Hi"}], "image": "img/a.png"},  # 7 no_assistant_turn
        "{this is not json",  # 8 malformed_record
        {"url": "http://x"},  # 9 malformed_record
        llava(gpt="Also good."),  # 10 good
    ]
    return write_jsonl(tmp_path / "mixed.jsonl", records)


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path, caplog):
    path = bad_records(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qwen_siglip.data"):
        ds = load_vlm_dataset(str(path))
    assert [ds[i]["messages"][1] for i in range(len(ds))] == [assistant("A red square."), assistant("Also good.")]
    assert ds.skipped == Counter(
        missing_image=1,
        undecodable_image=1,
        placeholder_image_mismatch=2,
        empty_turn=1,
        unknown_role=1,
        no_assistant_turn=1,
        malformed_record=2,
    )
    assert len(caplog.records) == 1  # ONE warning for the whole load
    warning = caplog.records[0].getMessage()
    assert "skipped 9" in warning and "placeholder_image_mismatch=2" in warning
    assert "mixed.jsonl record 1: field 'image': file 'img/nope.png' not found" in warning
    assert ds.summary() == "kept 2, skipped 9 (" + warning.split("skipped 9 (")[1].split(")")[0] + ")"


def test_strict_names_record_and_reason(tmp_path):
    make_image(tmp_path / "img/a.png")
    path = write_json(tmp_path / "pretrain.json", [llava()] * 17 + [llava(image="img/x.jpg")])
    msg = r"pretrain\.json record 17: field 'image': file 'img/x\.jpg' not found under image root \[missing_image\]"
    with pytest.raises(ValueError, match=msg):
        load_vlm_dataset(str(path), strict=True)
    with pytest.raises(ValueError, match=r"mixed\.jsonl record 1: .*\[missing_image\]"):
        load_vlm_dataset(str(bad_records(tmp_path)), strict=True)


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is whole but whose data stops part-way: it opens, and fails only when decoded."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buf, "JPEG")  # noise: does not compress
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_truncated_image_is_replaced_by_a_good_one_counted_once_or_raises_in_strict(tmp_path):
    make_image(tmp_path / "good.png", RED)
    truncated_jpeg(tmp_path / "trunc.jpg")
    path = str(write_json(tmp_path / "d.json", [llava(image="good.png"), llava(image="trunc.jpg")]))
    ds = load_vlm_dataset(path)
    assert len(ds) == 2 and ds.skipped == Counter()  # the header was fine at load time
    assert ds[1] is None and ds.late_skipped == Counter(undecodable_image=1)  # evaluation sees the hole
    hf = ds.to_hf()  # training: a good example stands in, so no batch is ever empty
    stand_in = hf[1]
    assert colors(stand_in) == [RED] and stand_in["messages"] == ds[0]["messages"]
    assert hf[1]["messages"] == stand_in["messages"] and ds[1] is None
    assert ds.late_skipped == Counter(undecodable_image=1) and ds.replaced == 2  # one record, however often met
    msg = r"d\.json record 1: field 'image': file 'trunc\.jpg': cannot decode its pixels .*\[undecodable_image\]"
    with pytest.raises(ValueError, match=msg):
        load_vlm_dataset(path, strict=True)[1]


# ----------------------------------------------------------------------------- streaming, limit, trainer


def test_streaming_yields_same_examples(tmp_path):
    path = str(bad_records(tmp_path))
    mapped = load_vlm_dataset(path)
    streamed = load_vlm_dataset(path, streaming=True)
    assert isinstance(streamed, torch.utils.data.IterableDataset)
    examples = list(streamed)
    assert [ex["messages"] for ex in examples] == [mapped[i]["messages"] for i in range(len(mapped))]
    assert [colors(ex) for ex in examples] == [colors(mapped[i]) for i in range(len(mapped))]
    assert streamed.skipped == mapped.skipped and sum(streamed.skipped.values()) == 9
    assert len(list(streamed)) == 2 and sum(streamed.skipped.values()) == 9  # a second pass counts afresh


def test_streaming_dataloader_workers_split_the_records(tmp_path):
    make_image(tmp_path / "img/a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [llava(gpt=f"answer {i}") for i in range(6)])
    loader = torch.utils.data.DataLoader(load_vlm_dataset(str(path), streaming=True), num_workers=2, collate_fn=list)
    answers = sorted(batch[0]["messages"][1]["content"][0]["text"] for batch in loader)
    assert answers == [f"answer {i}" for i in range(6)]  # each record once, not once per worker


def test_pickles_as_a_recipe_not_the_records(tmp_path):
    """Spawned DataLoader workers and `datasets` hashing (to_hf) pickle the dataset: keep that small."""
    make_image(tmp_path / "img/a.png")
    path = write_jsonl(tmp_path / "long.jsonl", [llava(gpt=f"{i} " + "long answer " * 100) for i in range(500)])
    ds = load_vlm_dataset(str(path))
    blob = pickle.dumps(ds)
    assert len(blob) < path.stat().st_size / 10  # the indices of the kept records, not their text
    copy = pickle.loads(blob)  # reads the file again
    assert len(copy) == 500 and copy[7]["messages"] == ds[7]["messages"] and colors(copy[7]) == colors(ds[7])


def test_missing_local_file_is_reported_plainly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_vlm_dataset(str(tmp_path / "nope.jsonl"))


def test_limit_keeps_the_first_good_examples(tmp_path):
    path = str(bad_records(tmp_path))
    assert len(load_vlm_dataset(path, limit=1)) == 1
    assert [ex["messages"][1] for ex in load_vlm_dataset(path, limit=2, streaming=True)][-1] == assistant("Also good.")


def test_works_as_sft_trainer_train_dataset(tmp_path):
    """TRL's SFTTrainer only takes `datasets` objects: to_hf() hands it the same examples, decoded per item."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, ProcessorMixin, Qwen2Config, Qwen2ForCausalLM
    from trl import SFTConfig, SFTTrainer

    class TinyProcessor(ProcessorMixin):
        def __init__(self, tokenizer):
            super().__init__(tokenizer)

    vocab = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    processor = TinyProcessor(PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="[PAD]", unk_token="[UNK]"))
    config = Qwen2Config(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    seen = []

    def collate(examples):
        seen.extend(examples)
        ids = torch.tensor([[2 + len(ex["images"])] * 4 for ex in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    make_image(tmp_path / "img/a.png")
    ds = load_vlm_dataset(str(write_jsonl(tmp_path / "d.jsonl", [llava(gpt=f"answer {i}") for i in range(4)])))
    streamed = load_vlm_dataset(str(tmp_path / "d.jsonl"), streaming=True)
    for train_dataset in (ds.to_hf(), streamed.to_hf()):
        args = SFTConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=2,
            dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            report_to="none",
            save_strategy="no",
        )
        model = Qwen2ForCausalLM(config)
        trainer = SFTTrainer(
            model, args, data_collator=collate, train_dataset=train_dataset, processing_class=processor
        )
        trainer.train()
    assert len(seen) == 8
    assert all(ex["images"][0].mode == "RGB" and ex["messages"][0]["content"][0] == IMG for ex in seen)
    assert sorted({ex["messages"][1]["content"][0]["text"] for ex in seen}) == [f"answer {i}" for i in range(4)]


# ----------------------------------------------------------------------------- hostile data


def test_path_errors_are_counted_skips_with_honest_reasons(tmp_path, caplog):
    make_image(tmp_path / "ok.png")
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block forever: it must never be opened
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop.png")
    records = [
        llava(image="a\0b.png"),  # 0 bad_path: ValueError "embedded null byte" from the OS layer
        llava(image="x" * 300 + ".png"),  # 1 bad_path: OSError "File name too long"
        llava(image="folder.png"),  # 2 not_a_file
        llava(image="pipe.png"),  # 3 not_a_file
        llava(image="https://example.com/cat.jpg"),  # 4 image_url
        llava(image="nope.png"),  # 5 missing_image
        llava(image="ok.png"),  # 6 good
        llava(image="loop.png"),  # 7 bad_path: a symlink loop (RuntimeError from resolve() before Python 3.13)
    ]
    path = str(write_json(tmp_path / "d.json", records))
    with caplog.at_level(logging.WARNING, logger="qwen_siglip.data"):
        ds = load_vlm_dataset(path)
    assert len(ds) == 1 and ds.skipped == Counter(bad_path=3, not_a_file=2, image_url=1, missing_image=1)
    assert "record 2: field 'image': file 'folder.png' is a folder" in caplog.text
    assert "record 3: field 'image': file 'pipe.png' is not a regular file" in caplog.text
    assert "record 4: field 'image': file 'https://example.com/cat.jpg' is a URL: training does not download" in (
        caplog.text
    )
    strict = [
        (0, r"d\.json record 0: field 'image': file 'a\\x00b\.png': the path holds a NUL byte \[bad_path\]"),
        (1, r"d\.json record 0: field 'image': file 'x{60}… \(304 characters\)': unusable path .*\[bad_path\]"),
        (3, r"d\.json record 0: field 'image': file 'pipe\.png' is not a regular file .*\[not_a_file\]"),
    ]
    for k, msg in strict:
        with pytest.raises(ValueError, match=msg):
            load_vlm_dataset(str(write_json(tmp_path / "d.json", [records[k]])), strict=True)


def test_messages_name_the_records_field_and_never_echo_blobs_or_reprs(tmp_path, caplog):
    b64 = "iVBORw0KGgo" + "A" * 5000
    trl = [user(IMG, TXT("Colour?")), assistant("Red.")]
    records = [
        {"messages": trl, "images": ["missing.png"]},  # 0 missing_image, field images[0]
        {"messages": trl, "images": [b64]},  # 1 a base64 string where a path belongs: not echoed whole
        {"messages": trl},  # 2 placeholder_image_mismatch, field images (not "image")
    ]
    rows = {"conversations": [llava()["conversations"]], "image": [b"not an image at all"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "blob.parquet"))  # inline bytes that are no image
    write_jsonl(tmp_path / "trl.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="qwen_siglip.data"):
        ds = load_vlm_dataset(str(tmp_path))
    assert len(ds) == 0 and ds.skipped == Counter(
        missing_image=1, bad_path=1, placeholder_image_mismatch=1, undecodable_image=1
    )
    text = caplog.text
    assert "blob.parquet record 0: field 'image': image of <19 bytes> cannot be opened as an image" in text
    assert "trl.jsonl record 0: field 'images[0]': file 'missing.png' not found under image root" in text
    assert "trl.jsonl record 1: field 'images[0]': file 'iVBORw0KGgoAAAA" in text and "characters)" in text
    assert "trl.jsonl record 2: field 'images': 1 <image> placeholders but 0 images" in text
    assert b64[:200] not in text and " at 0x" not in text and "BytesIO" not in text
    assert str(tmp_path) not in text.replace(f"checking {tmp_path}", "")  # no folder of this machine in messages


def test_load_rgb_refusals_carry_a_reason_and_a_clean_message(tmp_path):
    truncated = truncated_jpeg(tmp_path / "cut.jpg")
    make_image(tmp_path / "big.png", size=(80, 70))
    cases = [
        (truncated, "undecodable_image", "image 'cut.jpg': cannot decode its pixels"),
        (truncated.read_bytes()[:30], "undecodable_image", "image of <30 bytes> cannot be opened as an image"),
        (io.BytesIO(b"junk"), "undecodable_image", "not an image format PIL can read"),
        (tmp_path / "big.png", "too_many_pixels", "'big.png' is 80x70 = 5,600 pixels, over the cap of 5,000"),
        (tmp_path, "not_a_file", "is a folder"),
        (str(tmp_path / "nope.png"), "missing_image", "image 'nope.png' not found"),
        ("http://example.com/a.png", "image_url", "is a URL"),
        ({"bytes": None, "path": "a\0.png"}, "bad_path", "NUL byte"),
        (42, "malformed_record", "unusable image reference <a int>"),
    ]
    for src, reason, words in cases:
        with pytest.raises(images.ImageRefused, match=re.escape(words)) as caught:
            images.load_rgb(src, max_pixels=5000)
        assert (
            caught.value.reason == reason
            and str(tmp_path) not in str(caught.value)
            and " at 0x" not in str(caught.value)
        )


def test_invalid_json_or_non_utf8_file_names_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n  {"image": "a.png"},\n  {"image": "b.png",,}\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 3 column \d+: Expecting"):
        load_vlm_dataset(str(tmp_path / "bad.json"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"caption": "ok"}\n{"caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl: byte 0xe9 at line 2 is not UTF-8"):
        load_vlm_dataset(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "gbk.json").write_bytes('[\n\n {"caption": "中文"}]'.encode("gbk"))
    with pytest.raises(ValueError, match=r"gbk\.json: byte 0x\w\w at line 3 is not UTF-8"):
        load_vlm_dataset(str(tmp_path / "gbk.json"))


def test_bad_jsonl_line_is_a_counted_skip_that_names_its_line(tmp_path, caplog):
    make_image(tmp_path / "img/a.png")
    lines = [json.dumps(llava()), "", "", '{"image": "img/a.png", oops}', json.dumps(llava())]
    (tmp_path / "d.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # with a BOM
    with caplog.at_level(logging.WARNING, logger="qwen_siglip.data"):
        ds = load_vlm_dataset(str(tmp_path / "d.jsonl"))
    assert len(ds) == 2 and ds.skipped == Counter(malformed_record=1)
    assert "d.jsonl record 1: field 'record': line 4 is not valid JSON (Expecting property name" in caplog.text


def test_show_once_warning_prints_once_while_loading_many_images(tmp_path, monkeypatch):
    """A warnings.catch_warnings() per image resets Python's show-once registry: every such warning would print
    once per image instead of once."""
    for i in range(5):
        make_image(tmp_path / f"{i}.png", (i, 0, 0))
    path = write_json(tmp_path / "d.json", [llava(image=f"{i}.png") for i in range(5)])
    real_load = ImageFile.ImageFile.load

    def load_and_warn(im):
        warnings.warn("a show-once warning", UserWarning, stacklevel=1)  # one place: "default" shows it once
        return real_load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_and_warn)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        ds = load_vlm_dataset(str(path))
        images = [ds[i]["images"][0] for i in range(len(ds))]
    assert len(images) == 5
    assert [str(w.message) for w in shown] == ["a show-once warning"]


# ----------------------------------------------------------------------------- one decoder


def test_exif_orientation_is_applied_and_not_applied_twice(tmp_path):
    img = Image.new("RGB", (40, 20), "white")
    img.paste(RED, (0, 0, 20, 20))  # left half red, as the sensor stored it
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6  # the camera was turned: show it rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = images.load_rgb(tmp_path / "rot.jpg")
    assert upright.size == (20, 40)  # the left half is now the top half
    assert upright.getpixel((10, 5))[0] > 200 and upright.getpixel((10, 5))[1] < 60
    assert upright.getpixel((10, 35)) > (200, 200, 200)
    from transformers.image_utils import load_image  # what pipelines do with a PIL input: exif_transpose again

    assert load_image(upright).tobytes() == upright.tobytes()


def hostile_images(folder: Path) -> list[str]:
    """16-bit grey, RGBA, palette with a transparent entry, CMYK JPEG, EXIF-rotated JPEG: decoders disagree on all."""
    Image.new("I;16", (12, 8), 40000).save(folder / "i16.png")
    rgba = Image.new("RGBA", (12, 8), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 6, 8))
    rgba.save(folder / "rgba.png")
    pal = Image.new("P", (12, 8), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))
    pal.save(folder / "pal.png", transparency=0)
    Image.new("CMYK", (12, 8), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    rot = Image.new("RGB", (12, 8), "white")
    rot.paste(RED, (0, 0, 6, 8))
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6
    rot.save(folder / "rot.jpg", exif=exif)
    return ["i16.png", "rgba.png", "pal.png", "cmyk.jpg", "rot.jpg"]


def test_same_file_gives_same_pixel_values_on_every_path(tiny, tiny_checkpoint, tmp_path):
    """Data (VLMDataset -> processor), load_rgb as the app and evaluate use it, and a pipeline input we prepare."""
    from transformers import pipeline

    _, processor = tiny
    names = hostile_images(tmp_path)
    path = write_json(tmp_path / "d.json", [llava(image=name) for name in names])
    ds = load_vlm_dataset(str(path))
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint), trust_remote_code=True)

    def pixels(image: Image.Image) -> torch.Tensor:
        return processor(images=[image], text="<image>", return_tensors="pt")["pixel_values"]

    for i, name in enumerate(names):
        from_data = pixels(ds[i]["images"][0])
        opened = images.load_rgb(tmp_path / name)
        from_pipeline = pipe.preprocess({"images": [opened], "text": "<image>"})["pixel_values"]
        assert torch.equal(from_data, pixels(opened)), name
        assert torch.equal(from_data, from_pipeline), name
        with open(tmp_path / name, "rb") as f:  # an upload as a file object, and as bytes
            assert images.load_rgb(f).tobytes() == opened.tobytes() == images.load_rgb(f.seek(0) or f.read()).tobytes()
    grey, rgba, pal, _, rot = (images.load_rgb(tmp_path / name) for name in names)
    assert grey.getpixel((0, 0)) == (155, 155, 155)  # 40000 / 65535, not clipped to white
    assert rgba.getpixel((11, 0)) == pal.getpixel((11, 0)) == (255, 255, 255)  # transparent on white, not black
    assert rot.size == (8, 12)  # upright


# ----------------------------------------------------------------------------- runs that meet bad pixels late


def test_collator_replaces_a_batch_whose_examples_all_fail_unless_strict(tiny):
    from qwen_siglip.collator import VLMCollator

    _, processor = tiny
    good = {"messages": [user(TXT("Hi")), assistant("Hello.")], "images": []}
    collator = VLMCollator(processor)
    first = collator([good])
    again = collator([None, {"messages": None, "images": None}])  # to_hf() gives all-None fields
    assert torch.equal(again["input_ids"], first["input_ids"]) and torch.equal(again["labels"], first["labels"])
    assert collator.skipped == Counter(undecodable_image=2, batch_replaced=1)
    collator.strict = True
    with pytest.raises(ValueError, match="Every example of this batch was skipped"):
        collator([None])


def test_truncated_jpeg_run_with_batch_1_finishes_and_reports_the_skip(tiny_bases, tmp_path, caplog):
    from conftest import CPU_RUN

    from qwen_siglip import training

    make_image(tmp_path / "good.png", RED, size=(32, 32))
    truncated_jpeg(tmp_path / "cut.jpg")
    records = [llava(image="good.png"), *[llava(image="cut.jpg")] * 3, llava(image="good.png", gpt="Red.")]
    path = str(write_json(tmp_path / "d.json", records))
    vision, text = map(str, tiny_bases)
    argv = ["--vision_model", vision, "--text_model", text, "--dataset_name", path, *CPU_RUN, "--max_steps", "5"]
    argv += ["--per_device_train_batch_size", "1", "--global_batch_size", "1", "--max_pixels", "4096"]
    with caplog.at_level(logging.INFO):
        training.main("pretrain", argv + ["--seed", "1", "--output_dir", str(tmp_path / "out")])
    totals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: skipped at load")]
    # three bad records of five, each met once in the epoch: three records, three stand-ins (not one per attempt)
    decode = "{'undecodable_image': 3} (distinct records: 3; stand-ins: 3)"
    assert totals == [f"data: skipped at load {{}}, at decode {decode}, at collate {{}}"]
    msg = r"d\.json record 1: field 'image': file 'cut\.jpg': cannot decode its pixels .*\[undecodable_image\]"
    with pytest.raises(ValueError, match=msg):
        training.main("pretrain", argv + ["--strict", "true", "--output_dir", str(tmp_path / "s")])


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (7, 0)])
def test_an_image_with_no_pixels_is_refused_as_empty_image(size):
    with pytest.raises(images.ImageRefused, match=f"is {size[0]}x{size[1]}: it has no pixels") as e:
        images.load_rgb(Image.new("RGB", size))
    assert e.value.reason == "empty_image"


def test_a_record_that_failed_to_decode_is_counted_once_never_retried_and_stand_ins_are_spread(tmp_path, monkeypatch):
    """Four cut records among ten: each is decoded once and counted once, however often training draws it, and the
    records standing in for them are drawn from different good ones (the same ones on every load)."""
    for k in range(6):
        make_image(tmp_path / f"{k}.png", (k * 40, 0, 0))
    truncated_jpeg(tmp_path / "cut.jpg")
    names = ["0.png", "cut.jpg", "cut.jpg", "cut.jpg", "cut.jpg", "1.png", "2.png", "3.png", "4.png", "5.png"]
    path = str(write_json(tmp_path / "d.json", [llava(image=name) for name in names]))
    decoded = Counter()
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.update([im.filename]) or real_load(im))

    def stand_ins(ds) -> list:
        hf = ds.to_hf()
        return [colors(hf[i])[0] for epoch in range(2) for i in range(1, 5)]  # the cut ones, two epochs

    ds = load_vlm_dataset(path, max_pixels=4096)
    drawn = stand_ins(ds)
    assert ds.late_skipped == Counter(undecodable_image=4) and ds.replaced == 8
    assert decoded[str(tmp_path / "cut.jpg")] == 4  # once per bad record, never again
    assert len(set(drawn[:4])) >= 3  # spread over the good records, not the next good one each time
    assert drawn[:4] == drawn[4:] and drawn == stand_ins(load_vlm_dataset(path, max_pixels=4096))  # reproducible
    assert [ds[i] is None for i in range(1, 5)] == [True] * 4 and ds.late_skipped == Counter(undecodable_image=4)


def test_a_streamed_record_that_failed_to_decode_is_counted_each_pass_but_decoded_once(tmp_path, monkeypatch):
    make_image(tmp_path / "good.png")
    truncated_jpeg(tmp_path / "cut.jpg")
    path = write_jsonl(tmp_path / "d.jsonl", [llava(image="good.png"), llava(image="cut.jpg")])
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda im: decoded.append(Path(im.filename).name) or real_load(im)
    )
    ds = load_vlm_dataset(str(path), streaming=True, max_pixels=4096)
    for _ in range(2):
        assert len(list(ds)) == 1 and ds.late_skipped == Counter(undecodable_image=1)  # counted in each pass
    assert decoded.count("cut.jpg") == 1


# ----------------------------------------------------------------------------- nothing usable


def test_no_usable_records_is_one_error_with_counts_and_first_offenders(tmp_path):
    (tmp_path / "zero.json").write_text(json.dumps([llava(image="/dev/zero"), llava(image="nope.png")]))
    for streaming in (False, True):
        ds = load_vlm_dataset(str(tmp_path / "zero.json"), streaming=streaming)
        with pytest.raises(NoUsableRecords) as caught:
            require_usable(ds)
        message = str(caught.value)
        assert message.startswith(f"no usable records in {tmp_path / 'zero.json'}")
        assert "2 skipped (image_outside_root=1, missing_image=1); first offenders:" in message
        assert "zero.json record 0: field 'image': file '/dev/zero' is outside the image root" in message
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for name, streaming in [("empty.json", False), ("empty.jsonl", True)]:
        with pytest.raises(NoUsableRecords, match=f"no usable records in .*{name}.*: it holds no records"):
            require_usable(load_vlm_dataset(str(tmp_path / name), streaming=streaming))


def test_a_stream_whose_images_all_fail_late_is_not_usable(tmp_path):
    truncated_jpeg(tmp_path / "cut.jpg")
    path = write_jsonl(tmp_path / "d.jsonl", [llava(image="cut.jpg")] * 2)
    with pytest.raises(NoUsableRecords, match=r"2 skipped \(undecodable_image=2\); first offenders:\n  d\.jsonl rec"):
        require_usable(load_vlm_dataset(str(path), streaming=True, max_pixels=4096))


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_training_refuses_data_with_no_usable_record_before_the_trainer_is_built(
    stage, tiny_bases, tiny_checkpoint, tmp_path, monkeypatch
):
    """Before: TRL's SFTTrainer died on next(iter(train_dataset)) with a bare StopIteration."""
    from conftest import CPU_RUN

    from qwen_siglip import trainer, training

    monkeypatch.setattr(trainer.QwenSiglipTrainer, "__init__", lambda *a, **k: pytest.fail("trainer built"))
    model = ["--model_name_or_path", str(tiny_checkpoint)] if stage == "sft" else []
    model = model or ["--vision_model", str(tiny_bases[0]), "--text_model", str(tiny_bases[1])]
    empty, zero = tmp_path / "empty.jsonl", tmp_path / "zero.json"
    empty.write_text("")
    zero.write_text(json.dumps([llava(image="/dev/zero")]))
    make_image(tmp_path / "img/a.png")
    good = write_json(tmp_path / "good.json", [llava()])
    cases = [
        (["--dataset_name", zero], "no usable records in .*zero.json: 1 skipped \\(image_outside_root=1\\)"),
        (["--dataset_name", empty, "--dataset_streaming", "true"], "empty.jsonl \\(streamed\\): it holds no records"),
        (["--dataset_name", good, "--eval_dataset_name", empty], "empty.jsonl: it holds no records"),
    ]
    argv = [*model, *CPU_RUN, "--max_steps", "1", "--output_dir", str(tmp_path / "out")]
    for more, words in cases:
        with pytest.raises(NoUsableRecords, match=words):
            training.main(stage, argv + list(map(str, more)))


# ----------------------------------------------------------------------------- every field type-checked


@pytest.mark.parametrize(
    "record, reason, field",
    [
        ({"image": "a.png", "question": "Q?", "answers": True}, "malformed_record", "answers"),
        ({"image": "a.png", "question": "Q?", "answers": -1}, "malformed_record", "answers"),
        ({"image": "a.png", "question": "Q?", "answer": {}}, "malformed_record", "answer"),
        ({"image": "a.png", "question": "Q?"}, "no_assistant_turn", "answer"),
        ({"image": "a.png", "question": "Q?", "answers": ["yes", None]}, "malformed_record", "answers[1]"),
        ({"image": "a.png", "question": "Q?", "answers": [{"answer": []}]}, "malformed_record", "answers[0].answer"),
        ({"image": "a.png", "question": "Q?", "answers": {"answer": 5}}, "malformed_record", "answers.answer"),
        ({"image": "a.png", "question": 7, "answer": "yes"}, "malformed_record", "question"),
        ({"image": "a.png", "question": "Q?", "answer": ["yes"]}, "malformed_record", "answer"),
        ({"image_id": "a.png", "caption": 5}, "malformed_record", "caption"),
        ({"image_id": "a.png", "caption": ["ok", {"text": "x"}]}, "malformed_record", "caption[1]"),
        ({"image_id": 12, "caption": "ok"}, "malformed_record", "image_id"),
        ({"image": ["a.png", 3], "conversations": [{"from": "human", "value": "<image><image>"},
                                                   {"from": "gpt", "value": "x"}]}, "malformed_record", "image[1]"),
        ({"image": {"bytes": "a.png"}, "question": "Q?", "answer": "y"}, "malformed_record", "image.bytes"),
        ({"image": {"path": ["a.png"]}, "question": "Q?", "answer": "y"}, "malformed_record", "image.path"),
        ({"image": {"path": None, "bytes": None}, "question": "Q?", "answer": "y"}, "malformed_record", "image"),
        ({"image": [["a.png"]], "question": "Q?", "answer": "y"}, "malformed_record", "image[0]"),
        ({"conversations": {"from": "human"}}, "malformed_record", "conversations"),
        ({"conversations": ["hi", {"from": "gpt", "value": "x"}]}, "malformed_record", "conversations[0]"),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}, "malformed_record",
         "conversations[0].value"),
        ({"conversations": [{"from": ["human"], "value": "hi"}]}, "unknown_role", "conversations[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}, assistant("x")]},
         "malformed_record", "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": 5}]}, assistant("x")]}, "malformed_record",
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "hi \ud800"}, assistant("x")]}, "invalid_unicode",
         "messages[0].content"),
        ({"image_id": "a.png", "caption": "caf\udce9"}, "invalid_unicode", "caption"),
    ],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_a_counted_skip_naming_the_field(tmp_path, caplog, record, reason, field):
    """Before: `answers: true` raised TypeError and a missing answer KeyError, from the load itself."""
    make_image(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(llava(image="a.png")) + "\n")  # one good record too
    with caplog.at_level(logging.WARNING, logger="qwen_siglip.data"):
        ds = load_vlm_dataset(str(path))
    assert len(ds) == 1 and ds.skipped == Counter({reason: 1})
    assert f"d.jsonl record 0: field '{field}': " in caplog.text
    with pytest.raises(ValueError, match=re.escape(f"d.jsonl record 0: field '{field}': ") + f".*\\[{reason}\\]"):
        load_vlm_dataset(str(path), strict=True)


def test_answers_may_be_numbers_and_the_majority_wins(tmp_path):
    make_image(tmp_path / "a.png")
    records = [{"image": "a.png", "question": "How many?", "answers": [2, "2", {"answer": 3}]},
               {"image": "a.png", "question": "How many?", "answer": 4}]  # fmt: skip
    ds = load_vlm_dataset(str(write_jsonl(tmp_path / "d.jsonl", records)))
    assert [ds[i]["messages"][1] for i in range(2)] == [assistant("2"), assistant("4")]
