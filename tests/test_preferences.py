"""Stage 3's data, batches and rewards: preference pairs and GRPO prompts read through the data module, DPO batches
whose completion is exactly what SFT labels, and the reward functions.

Every file is built here, in tmp_path. Tests taking `each_processor` run with the tokenizer trained in code and with
Qwen's real BPE.
"""

import copy
import json

import datasets
import pytest
import torch
from conftest import shape_image
from PIL import Image

from qwen_siglip import rewards
from qwen_siglip.pair_collator import PairCollator
from qwen_siglip.preferences import load_pairs, prompt_loader, prompt_tokens, write_pairs

END = "<|im_end|>"


def write_jsonl(path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return str(path)


def images_in(folder, *colours: str) -> list[str]:
    (folder / "img").mkdir(exist_ok=True)
    for colour in colours:
        shape_image(colour, size=32).save(folder / "img" / f"{colour}.png")
    return [f"img/{c}.png" for c in colours]


def rlaif_v(image="img/red.png", question="What colour is the shape?", chosen="red", rejected="blue") -> dict:
    return {"image": image, "question": question, "chosen": chosen, "rejected": rejected, "ds_name": "toy"}


def trl_pair(image="img/red.png", question="What colour is the shape?", chosen="red", rejected="blue") -> dict:
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    answer = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]  # noqa: E731
    return {"prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected), "images": [image]}


def red(example: dict) -> bool:
    return example["images"][0].getpixel((16, 16))[0] > 200 and len(example["images"]) == 1


# ----------------------------------------------------------------------------- preference records


def test_trl_and_rlaif_v_records_read_to_the_same_pair_from_every_source(tmp_path):
    images_in(tmp_path, "red")
    expected = trl_pair()
    files = [
        write_jsonl(tmp_path / "rlaif.jsonl", [rlaif_v()]),
        write_jsonl(tmp_path / "trl.jsonl", [trl_pair()]),
        # TRL's implicit prompt: whole conversations, the shared turns are the prompt
        write_jsonl(
            tmp_path / "implicit.jsonl",
            [
                {
                    "chosen": expected["prompt"] + expected["chosen"],
                    "rejected": expected["prompt"] + expected["rejected"],
                    "images": ["img/red.png"],
                }
            ],
        ),  # fmt: skip
        str(tmp_path / "trl.json"),
    ]
    (tmp_path / "trl.json").write_text(json.dumps([trl_pair()]))
    for source in files:
        (example,) = [load_pairs(source)[0]]
        assert {k: example[k] for k in ("prompt", "chosen", "rejected")} == {
            k: expected[k] for k in ("prompt", "chosen", "rejected")
        }, source
        assert red(example), source


def test_a_hub_layout_folder_of_parquet_with_image_bytes_reads_like_rlaif_v_on_the_hub(tmp_path):
    """openbmb/RLAIF-V-Dataset's layout: data/*.parquet, `image` an Image feature (bytes), string answers."""
    image = shape_image("red", size=32)
    rows = {key: [value] for key, value in rlaif_v(image=image).items()}
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    pairs = load_pairs(str(tmp_path / "hub"))  # through datasets.load_dataset, as a Hub id is
    assert len(pairs) == 1 and red(pairs[0]) and pairs[0]["chosen"][0]["content"][0]["text"] == "red"


BAD = {
    "missing_image": rlaif_v(image="img/none.png"),
    "image_outside_root": rlaif_v(image="../outside.png"),
    "identical_pair": rlaif_v(rejected=" red "),
    "placeholder_image_mismatch": rlaif_v(question="<image>\n<image>\nCompare."),
    "empty_turn": rlaif_v(chosen="  "),
    "malformed_record": {**trl_pair(), "prompt": trl_pair()["prompt"] + trl_pair()["chosen"]},  # ends with an answer
    "unknown_role": {**trl_pair(), "chosen": [{"role": "robot", "content": "red"}]},
}


def test_bad_pairs_are_skipped_and_counted_by_reason_and_strict_stops_at_the_first(tmp_path):
    images_in(tmp_path, "red")
    records = [rlaif_v(), *BAD.values(), "{not json", {"chosen": "red"}, {**trl_pair(), "chosen": "<image>\nred"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    pairs = load_pairs(path)
    assert len(pairs) == 1 and red(pairs[0])
    expected = {reason: 1 for reason in BAD}
    expected["malformed_record"] += 3  # the prompt ending with an answer, the bad line, no rejected, image in chosen
    assert dict(pairs.skipped) == expected
    with pytest.raises(ValueError, match=r"pairs.jsonl record 1: field 'image': .*missing_image"):
        load_pairs(path, strict=True)


# ----------------------------------------------------------------------------- GRPO prompts


def test_grpo_prompts_end_before_the_last_answer_which_is_the_solution(tmp_path, tiny):
    images_in(tmp_path, "red", "blue")
    multi = {"conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
                               {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "A square"},
                               {"from": "human", "value": "Thanks"}], "image": "img/red.png"}  # fmt: skip
    vqa = {"image": "img/blue.png", "question": "What colour is it?", "answers": ["blue", "blue", "navy"]}
    after = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "<image>\nand this?"}], "images": ["img/red.png"]}  # fmt: skip
    prompts = prompt_loader(tiny[1], None)(write_jsonl(tmp_path / "p.jsonl", [multi, vqa, after]))
    first, second = prompts[0], prompts[1]
    assert first["solution"] == "A square" and [m["role"] for m in first["prompt"]] == ["user", "assistant", "user"]
    assert second["solution"] == "blue" and second["prompt"][0]["content"][0] == {"type": "image"}
    assert len(prompts) == 2 and dict(prompts.skipped) == {"malformed_record": 1}  # an image after the answer


def test_prompt_length_is_counted_as_generation_sees_it_and_long_prompts_are_skipped(tmp_path, each_processor):
    images_in(tmp_path, "red")
    short, long = (rlaif_v(question=q) for q in ("What colour?", "Why? " * 200))
    path = write_jsonl(tmp_path / "p.jsonl", [{"image": r["image"], "question": r["question"], "answer": "red"}
                                              for r in (short, long)])  # fmt: skip
    n = prompt_tokens(each_processor, question_prompt(short))
    # The count without decoding an image equals the processor's own, image expanded, on the real image.
    text = each_processor.apply_chat_template(question_prompt(short), add_generation_prompt=True)
    real = each_processor(text=text, images=[Image.open(tmp_path / "img/red.png")])["input_ids"][0]
    assert n == len(real) and real.count(each_processor.image_token_id) == each_processor.num_image_tokens
    prompts = prompt_loader(each_processor, n)(path)
    assert len(prompts) == 1 and dict(prompts.skipped) == {"prompt_too_long": 1}
    with pytest.raises(ValueError, match=r"record 1: field 'prompt': .* over max_prompt_length"):
        prompt_loader(each_processor, n)(path, strict=True)


def question_prompt(record: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]


# ----------------------------------------------------------------------------- DPO batches


def completions(processor, batch) -> list[str]:
    return [processor.tokenizer.decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"],
                                                                           batch["completion_mask"])]  # fmt: skip


@pytest.mark.parametrize("answer", ["red", "\nred", "红色的正方形", "one <|im_end|> two"])
def test_the_completion_is_the_answer_and_end_of_turn_as_sft_labels_it(each_processor, answer):
    example = {**trl_pair(chosen=answer, rejected="blue"), "images": [shape_image("red")]}
    batch = PairCollator(each_processor, max_length=512)([example, {**example, "images": [shape_image("blue")]}])
    typed = answer.replace("<|", "<\u200b|")  # the template's escape of typed special tokens
    assert completions(each_processor, batch) == [typed + END] * 2 + ["blue" + END] * 2  # chosen rows, then rejected
    # The prompt is what generate() starts from: the chat template's generation prompt, image expanded.
    text = each_processor.apply_chat_template(example["prompt"], add_generation_prompt=True)
    prompt = each_processor(text=text, images=[shape_image("red")])["input_ids"][0]
    for row in (0, 2):  # the chosen and rejected rows of one pair share the prompt, token for token
        ids, mask = batch["input_ids"][row], batch["completion_mask"][row]
        assert ids[: len(prompt)].tolist() == prompt and not mask[: len(prompt)].any()
        alone = each_processor.tokenizer.encode((typed if row == 0 else "blue") + END, add_special_tokens=False)
        assert ids[mask.bool()].tolist() == alone
    # Image tokens and padding are never completion tokens.
    assert not batch["completion_mask"][batch["input_ids"] == each_processor.image_token_id].any()
    assert not batch["completion_mask"][batch["attention_mask"] == 0].any()
    # Both rows of a pair get the very same pixels: chosen rows' images, then the same again for the rejected rows.
    assert batch["pixel_values"].shape[0] == 4 and torch.equal(batch["pixel_values"][:2], batch["pixel_values"][2:])


def test_trls_own_collator_would_also_score_the_newline_after_end_of_turn(tiny):
    """Why stage 3 has its own collator: TRL's vision collator takes the completion from the rendered chat, newline
    after `<|im_end|>` included, a token SFT never trained and generation never emits."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    example = {**trl_pair(), "images": [shape_image("red")]}
    theirs = DataCollatorForVisionPreference(processor=tiny[1])([copy.deepcopy(example)])
    ours = PairCollator(tiny[1], max_length=512)([example])
    assert (
        completions(tiny[1], theirs)
        == [c + "\n" for c in completions(tiny[1], ours)]
        == ["red<|im_end|>\n", "blue<|im_end|>\n"]
    )


def test_truncation_shortens_the_completions_and_never_cuts_the_image_or_the_prompt(tiny):
    processor = tiny[1]
    example = {**trl_pair(chosen="a long answer " * 8, rejected="no"), "images": [shape_image("red")]}
    full = PairCollator(processor, max_length=None)([example])
    prompt_length = int(full["completion_mask"][0].argmax())  # the first completion token
    collator = PairCollator(processor, max_length=prompt_length + 3)
    batch = collator([example])
    assert batch["input_ids"].shape[1] == prompt_length + 3 and batch["completion_mask"][0].sum() == 3
    assert torch.equal(batch["input_ids"][0, :prompt_length], full["input_ids"][0, :prompt_length])
    assert (batch["input_ids"] == processor.image_token_id).sum() == 2 * processor.num_image_tokens
    image_end = int((full["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")).nonzero())
    cut_image, no_room = (
        PairCollator(processor, max_length=image_end),
        PairCollator(processor, max_length=prompt_length),
    )
    for collator, reason in ((cut_image, "too_long_image_would_be_cut"), (no_room, "no_assistant_tokens_left")):
        with pytest.raises(ValueError, match=reason):  # every example of the batch skipped, and counted
            collator([example])
        assert dict(collator.skipped) == {reason: 1}


# ----------------------------------------------------------------------------- rewards


def conversational(*texts: str) -> list:
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_exact_match_uses_evaluations_normalisation_and_reads_both_completion_forms():
    got = rewards.exact_match(conversational("The Red.", "red square", "红色。"), ["red", "red", "红色"])
    assert got == [1.0, 0.0, 1.0]
    assert rewards.exact_match(["  RED!"], ["red"]) == [1.0]


def test_length_format_rewards_a_one_line_answer_of_the_references_length():
    answers = conversational("blue", "dark blue", "one two three", "w x y z", "", "red\nblue", "红色")
    got = rewards.length_format(answers, ["red", "red", "two words", "two words", "red", "red", "蓝色"])
    assert got == [1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0]


def test_custom_rewards_load_by_module_function_as_trl_functions_or_as_scorers():
    assert rewards.load_reward("exact_match") is rewards.exact_match
    trl_style = rewards.load_reward("qwen_siglip.rewards:length_format")  # takes `completions`: used as it is
    assert trl_style is rewards.length_format
    scorer = rewards.load_reward("qwen_siglip.synthetic:caption_correct")  # evaluate_vlm.py's --scorer kind
    assert scorer.__name__ == "caption_correct"
    assert scorer(conversational("A red circle.", "A blue circle."), ["A red circle."] * 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="module:function"):
        rewards.load_reward("caption_correct")


def test_write_pairs_spoils_each_answer_on_purpose_and_the_pairs_read_back(tmp_path):
    images_in(tmp_path, "red")
    records = [
        {"image": "img/red.png", "question": "What colour?", "answer": "red"},
        {"image": "img/red.png", "question": "Describe it.", "answer": "A red square."},  # corrupt gives None
        {"image": "img/none.png", "question": "What colour?", "answer": "red"},  # kept as written: skipped at load
    ]
    source = write_jsonl(tmp_path / "qa.jsonl", records)
    spoil = lambda answer, rng: {"red": "blue"}.get(answer)  # noqa: E731
    pairs = load_pairs(str(write_pairs(source, tmp_path / "pairs.jsonl", spoil)))
    assert len(pairs) == 1 and dict(pairs.skipped) == {"missing_image": 1}
    assert pairs[0]["prompt"] == trl_pair(question="What colour?")["prompt"] and red(pairs[0])
    assert [pairs[0][side][0]["content"][0]["text"] for side in ("chosen", "rejected")] == ["red", "blue"]
