"""Stage 3 (train_dpo.py, train_grpo.py): DPO's numbers checked by hand, the reference model, GRPO's generation and
learning, full and LoRA, resume after SIGKILL, two ranks, the push, the Auto classes and LLaVA, TRL's stock CLI.

Data and preference format: test_preferences.py. Every run starts from `tiny_checkpoint` (a tiny random model saved
as a stage-2 folder) on the synthetic shapes at 32 px.
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_RUN, ROOT, changed, run_stage, shape_image, torchrun, weights
from test_training import FAKE_TOKEN, files_the_push_uploads, mock_hub
from transformers import TrainerCallback
from trl import DPOTrainer

from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
from processing_qwen_siglip import QwenSiglipProcessor
from qwen_siglip import stage3, synthetic, training
from qwen_siglip.preferences import load_pairs, write_pairs
from qwen_siglip.rewards import length_format

END = "<|im_end|>"
GRPO_RUN = [a for a in CPU_RUN if a not in ("--max_length", "256")]  # GRPO has no max_length: prompts are kept whole
GRPO_RUN += ["--num_generations", "4", "--max_completion_length", "4"]


@pytest.fixture(scope="module")
def toy(shapes_data) -> dict[str, Path]:
    """`pairs`: pairs made from the shapes questions by `write_pairs` (the right answer vs another of its kind; one
    more record, whose image is missing, is skipped and counted). `words`: the questions answered with one English
    word."""
    folder = shapes_data["sft_train"].parent
    kinds = [list(v) for v in synthetic.ANSWERS.values()]
    kinds += [[synthetic.ZH[a] for a in v if a in synthetic.ZH] for v in synthetic.ANSWERS.values()]

    def another_of_its_kind(answer: str, rng: random.Random) -> str | None:
        kind = next((k for k in kinds if answer in k), None)  # captions have no kind: no pair
        return rng.choice([a for a in kind if a != answer]) if kind else None

    pairs = write_pairs(str(shapes_data["sft_train"]), folder / "pairs.jsonl", another_of_its_kind)
    first = json.loads(pairs.read_text().splitlines()[0])
    with pairs.open("a") as f:
        f.write(json.dumps({**first, "images": ["images/missing.png"]}) + "\n")
    rows = [json.loads(line) for line in shapes_data["sft_train"].read_text().splitlines()]
    words = [
        r
        for r in rows
        if len(r["conversations"]) == 2 and re.fullmatch(r"[a-z0-9]+", r["conversations"][1]["content"])
    ]
    (folder / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in words))
    return {"pairs": pairs, "words": folder / "words.jsonl"}


def stage_args(stage: str, start: Path, toy: dict, out: Path, *extra: str) -> list[str]:
    data = toy["pairs"] if stage == "dpo" else toy["words"]
    base = CPU_RUN if stage == "dpo" else [*GRPO_RUN, "--reward_funcs", "length_format"]
    return ["--model_name_or_path", str(start), "--dataset_name", str(data), "--output_dir", str(out), *base,
            "--max_steps", "2", *extra]  # fmt: skip


def sequence_logp(model, processor, prompt: list, completion: list, image) -> torch.Tensor:
    """log p(completion | prompt, image) from our model's own logits, the completion found by hand: the chat
    template's text of prompt + completion, less the prompt's generation prompt and the newline after `<|im_end|>`."""
    prompt_text = processor.apply_chat_template(prompt, add_generation_prompt=True)
    text = processor.apply_chat_template(prompt + completion)
    assert text.startswith(prompt_text) and text.endswith(END + "\n")
    x = processor(text=text.removesuffix("\n"), images=[image], return_tensors="pt")
    n_prompt = len(processor(text=prompt_text, images=[image])["input_ids"][0])
    with torch.no_grad():
        logits = model(**x).logits[0].float()  # (L, vocab)
    ids = x["input_ids"][0]
    per_token = logits[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]  # log p(token t | tokens < t)
    return per_token[n_prompt - 1 :].sum()


# ----------------------------------------------------------------------------- DPO's numbers


@pytest.fixture(scope="module")
def dpo_trainer(tiny_checkpoint, toy, tmp_path_factory):
    """A DPO trainer, not trained, whose policy has been moved away from the reference (the start) at random."""
    argv = stage_args("dpo", tiny_checkpoint, toy, tmp_path_factory.mktemp("dpo_trainer"), "--beta", "0.5")
    trainer = stage3.build_trainer("dpo", argv)[0]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return trainer


def test_dpo_loss_on_one_pair_equals_a_hand_computation_from_our_models_log_probabilities(
    dpo_trainer, tiny_checkpoint
):
    trainer, processor = dpo_trainer, dpo_trainer.processing_class
    example = trainer.train_dataset[0]
    loss = trainer.compute_loss(trainer.model, trainer.data_collator([example]))
    start = QwenSiglipForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()  # the reference, loaded anew
    logp = {}
    for who, model in (("policy", trainer.model), ("ref", start)):
        for side in ("chosen", "rejected"):
            logp[who, side] = sequence_logp(model, processor, example["prompt"], example[side], example["images"][0])
    chosen, rejected = (logp["policy", side] - logp["ref", side] for side in ("chosen", "rejected"))
    margin = chosen - rejected
    assert abs(margin) > 0.05  # the policy differs from the reference: the loss is not trivially log 2
    torch.testing.assert_close(loss.detach(), -F.logsigmoid(0.5 * margin), rtol=1e-5, atol=1e-5)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    assert logged["logps/chosen"][-1] == pytest.approx(logp["policy", "chosen"].item(), rel=1e-5)
    assert logged["logps/rejected"][-1] == pytest.approx(logp["policy", "rejected"].item(), rel=1e-5)


def two_pairs(trainer) -> dict:
    return trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])


def test_changing_an_image_tokens_label_state_changes_nothing(dpo_trainer):
    trainer = dpo_trainer
    batch = two_pairs(trainer)
    image_token = trainer.model.config.image_token_id
    assert (batch["input_ids"] == image_token).any() and (batch["attention_mask"] == 0).any()  # images and padding
    marked = dict(batch, completion_mask=batch["completion_mask"].clone())
    marked["completion_mask"][batch["input_ids"] == image_token] = 1  # image tokens marked as completion
    marked["completion_mask"][batch["attention_mask"] == 0] = 1  # and padding too
    with torch.no_grad():
        loss, loss_marked = trainer.compute_loss(trainer.model, batch), trainer.compute_loss(trainer.model, marked)
        unguarded = DPOTrainer.compute_loss(trainer, trainer.model, marked)  # TRL's own, without our guard
    assert torch.equal(loss, loss_marked)
    assert not torch.allclose(unguarded, loss)  # TRL alone would score those tokens: the guard is what holds


def test_chosen_and_rejected_of_a_pair_see_the_same_image_features(dpo_trainer):
    trainer, seen = dpo_trainer, []
    hook = trainer.model.model.multi_modal_projector.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        with torch.no_grad():
            trainer.compute_loss(trainer.model, two_pairs(trainer))
    finally:
        hook.remove()
    features = seen[0]  # the policy's forward: (4 images, tokens, hidden), the chosen rows' then the rejected rows'
    assert features.shape[0] == 4 and torch.equal(features[:2], features[2:])
    assert not torch.equal(features[0], features[1])  # two different images


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_the_reference_is_the_frozen_start_loaded_through_our_own_classes(stage, tiny_checkpoint, toy, tmp_path):
    extra = ["--beta", "0.04"] if stage == "grpo" else []  # GRPO keeps a reference only with a KL term
    argv = stage_args(stage, tiny_checkpoint, toy, tmp_path, "--learning_rate", "1e-2", *extra)
    trainer = stage3.build_trainer(stage, argv)[0]
    reference = trainer.ref_model
    assert type(reference) is QwenSiglipForConditionalGeneration  # not a copy of the folder's remote code
    assert reference is not trainer.model and not any(p.requires_grad for p in reference.parameters())
    trainer.train()
    start = weights(tiny_checkpoint)
    after = dict(reference.named_parameters())
    assert start.keys() == after.keys() and all(torch.equal(after[k], v) for k, v in start.items())
    assert changed(start, {k: v.detach() for k, v in trainer.model.named_parameters()}, "model.language_model.")


def test_with_lora_the_reference_is_the_same_weights_with_the_adapter_off(tiny_checkpoint, toy, tmp_path):
    argv = stage_args("dpo", tiny_checkpoint, toy, tmp_path, "--use_peft", "true", "--lora_r", "4",
                      "--learning_rate", "1e-2")  # fmt: skip
    trainer = stage3.build_trainer("dpo", argv)[0]
    assert trainer.ref_model is None  # no second copy in memory
    trainer.train()
    start = QwenSiglipForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    x = trainer.data_collator([trainer.train_dataset[0]])
    x = {k: x[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model = trainer.model.eval()
    with torch.no_grad():
        with model.disable_adapter():  # what TRL does for the reference
            reference = model(**x).logits
        policy, original = model(**x).logits, start(**x).logits
    torch.testing.assert_close(reference, original)  # the projector's modules_to_save copy is off too
    assert not torch.allclose(policy, original)


class KeepLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_dpo_margin_grows_over_a_few_steps_on_a_toy_preference_set(tiny_checkpoint, toy, tmp_path):
    out = stage3.main("dpo", stage_args("dpo", tiny_checkpoint, toy, tmp_path, "--learning_rate", "5e-3",
                                        "--max_steps", "6", "--lr_scheduler_type", "constant"))  # fmt: skip
    processor = QwenSiglipProcessor.from_pretrained(out)
    pairs = load_pairs(str(toy["pairs"]))
    models = [QwenSiglipForConditionalGeneration.from_pretrained(f).eval() for f in (tiny_checkpoint, out)]
    margins = []
    for model in models:  # mean log p(chosen) - log p(rejected) over the set, by hand, before and after
        m = [sequence_logp(model, processor, p["prompt"], p["chosen"], p["images"][0])
             - sequence_logp(model, processor, p["prompt"], p["rejected"], p["images"][0]) for p in pairs]  # fmt: skip
        margins.append(torch.stack(m).mean().item())
    assert margins[1] > margins[0] + 0.5, margins


# ----------------------------------------------------------------------------- GRPO


RECORDED: list[dict] = []


def recording_reward(prompts, completions, completion_ids, solution, **kwargs) -> list[float]:
    """length_format, and every call's arguments kept for the test (loaded as `test_stage3:recording_reward`)."""
    RECORDED.append(dict(prompts=prompts, completion_ids=completion_ids, solution=solution))
    return length_format(completions, solution)


def test_grpo_generates_through_our_generate_with_images_cache_and_stops(tiny_checkpoint, toy, tmp_path, monkeypatch):
    processor = QwenSiglipProcessor.from_pretrained(tiny_checkpoint)
    im_end, image = processor.tokenizer.convert_tokens_to_ids([END, processor.image_token])
    # Push both up, enough to beat the ~150k other tokens of a near-uniform tiny model: <|im_end|> then ends most
    # answers within a few tokens (whatever the weights), <|image_pad|> would be everywhere unless suppressed.
    bias = json.dumps({"sequence_bias": [[[im_end], 12.0], [[image], 12.0]]})
    argv = stage_args("grpo", tiny_checkpoint, toy, tmp_path, "--max_steps", "1", "--per_device_train_batch_size",
                      "8", "--global_batch_size", "8", "--max_completion_length", "6", "--generation_kwargs", bias,
                      "--reward_funcs", "test_stage3:recording_reward")  # fmt: skip
    trainer = stage3.build_trainer("grpo", argv)[0]
    generated, calls = [], []
    generate = QwenSiglipForConditionalGeneration.generate
    monkeypatch.setattr(QwenSiglipForConditionalGeneration, "generate",
                        lambda self, **kw: generated.append(kw) or generate(self, **kw))  # fmt: skip

    def record(module, args, kwargs):
        cache = kwargs.get("cache")
        calls.append((kwargs["input_ids"].shape[1], cache.get_seq_length() if cache else 0, "pixel_values" in kwargs
                      and kwargs["pixel_values"] is not None, kwargs.get("use_cache")))  # fmt: skip

    trainer.model.model.register_forward_pre_hook(record, with_kwargs=True)
    RECORDED.clear()
    trainer.train()
    (gen,) = generated
    ids, pixels = gen["input_ids"], gen["pixel_values"]
    # TRL's batching: 2 prompts x 4 answers each, every row with its own copy of its prompt's image.
    assert ids.shape[0] == pixels.shape[0] == 8
    assert all(torch.equal(ids[i], ids[i - i % 4]) for i in range(8)) and not torch.equal(ids[0], ids[4])
    steps = [c for c in calls if c[3] is not False][: len(RECORDED[0]["completion_ids"][0]) + 1]
    assert steps[0][1] == 0 and steps[0][2] and steps[0][0] == ids.shape[1]  # prefill: the prompt, with its pixels
    assert all(length == 1 and cached > 0 for length, cached, _, _ in steps[1:])  # then one token at a time, cached
    (call,) = RECORDED  # the reward sees each prompt's reference answer, once per answer to it
    references = {json.loads(line)["conversations"][1]["content"] for line in toy["words"].read_text().splitlines()}
    assert all(call["solution"][i] == call["solution"][i - i % 4] in references for i in range(8))
    answers = call["completion_ids"]
    assert not any(image in a for a in answers)  # suppressed, though pushed up
    assert any(a[-1] == im_end and len(a) < 6 for a in answers)  # answers do end at <|im_end|>
    assert all(im_end not in a[:-1] and len(a) <= 6 for a in answers)  # and nothing follows it


def test_grpo_mean_reward_rises_on_a_toy_task(tiny_checkpoint, toy, tmp_path):
    """One-word answers (length_format against one-word references): the random model learns the form in seconds."""
    logs = KeepLogs()
    stage3.main("grpo", stage_args("grpo", tiny_checkpoint, toy, tmp_path, "--max_steps", "20", "--learning_rate",
                                   "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
                                   "--per_device_train_batch_size", "16", "--global_batch_size", "16",
                                   "--num_generations", "8"), [logs])  # fmt: skip
    rewards = [log["reward"] for log in logs.logs if "reward" in log]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, rewards


# ----------------------------------------------------------------------------- the stage machinery


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_full_and_lora_train_what_they_should_and_write_the_card(stage, lora, tiny_checkpoint, toy, tmp_path, caplog):
    extra = ["--use_peft", "true", "--lora_r", "4", "--merge_adapter", "true"] if lora else []
    with caplog.at_level("INFO"):
        out = stage3.main(stage, stage_args(stage, tiny_checkpoint, toy, tmp_path, "--learning_rate", "1e-2", *extra))
    before, after = weights(tiny_checkpoint), weights(out)
    assert set(before) == set(after)  # plain keys, LoRA merged: no lora_A/B, no base_layer, no modules_to_save
    assert changed(before, after, "model.language_model.layers.") and changed(
        before, after, "model.multi_modal_projector."
    )
    assert not changed(before, after, "model.vision_tower.")
    assert {"README.md", "loss.png", "config.json", "modeling_qwen_siglip.py", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }
    card = (out / "README.md").read_text()
    assert f"- {stage}" in card and "| epochs / steps |" in card and "/ 2 |" in card
    assert ("| loss | sigmoid |" in card) if stage == "dpo" else ("| rewards | length_format |" in card)
    assert (
        "final reward margin" in card
        if stage == "dpo"
        else "| answers per prompt / max answer tokens | 4 / 4 |" in card
    )
    assert str(tmp_path) not in card
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2/2 loss")]
    assert progress and ("margin" if stage == "dpo" else "reward") in progress[0]
    skipped = "{'missing_image': 1}" if stage == "dpo" else "{}"  # the toy pairs end with a missing image
    assert any(f"data: skipped at load {skipped}" in r.getMessage() for r in caplog.records)


RESUMABLE = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_resume_after_sigkill_reaches_the_weights_of_an_unbroken_run(stage, tiny_checkpoint, toy, tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    done = run_stage([stage, *stage_args(stage, tiny_checkpoint, toy, unbroken, *RESUMABLE)], {})
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = run_stage(
        [stage, *stage_args(stage, tiny_checkpoint, toy, broken, *RESUMABLE)], {"QS_KILL_AT_STEP": "2"}
    )
    assert crashed.returncode == -9 and (broken / "checkpoint-2").is_dir()
    resume = ["--resume_from_checkpoint", "true"]
    resumed = run_stage([stage, *stage_args(stage, tiny_checkpoint, toy, broken, *RESUMABLE, *resume)], {})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(unbroken), weights(broken)
    assert a.keys() == b.keys() and changed(weights(tiny_checkpoint), a, "model.language_model.")
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_two_gloo_ranks_end_identical(stage, tiny_checkpoint, toy, tmp_path):
    ranks = ["--per_device_train_batch_size", "4", "--global_batch_size", "8", "--ddp_backend", "gloo"]
    args = [stage, *stage_args(stage, tiny_checkpoint, toy, tmp_path / "out", *ranks)]
    result = run_stage(args, {"QS_DUMP_WEIGHTS": str(tmp_path), "QS_DUMP_ARGS": str(tmp_path)}, launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"args{rank}.json").read_text())
        assert seen["env_world_size"] == 2 and seen["gradient_accumulation_steps"] == 1, seen
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert changed(weights(tiny_checkpoint), weights(tmp_path / "out"), "model.language_model.")


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_nothing_pushed_holds_the_token_or_a_path_of_the_training_machine(
    stage, tiny_checkpoint, toy, tmp_path, tmp_path_factory, monkeypatch
):
    uploads = mock_hub(monkeypatch)
    push = ["--push_to_hub", "true", "--hub_model_id", "someone/x", "--hub_token", FAKE_TOKEN,
            "--report_to", "tensorboard", "--save_strategy", "steps", "--save_steps", "1"]  # fmt: skip
    out = stage3.main(stage, stage_args(stage, tiny_checkpoint, toy, tmp_path / "run", *push))
    (upload,) = uploads
    pushed = files_the_push_uploads(upload)
    assert {"model.safetensors", "config.json", "README.md", "loss.png", "modeling_qwen_siglip.py"} <= set(pushed)
    assert not [f for f in pushed if f.startswith(("checkpoint-", "runs/")) or f == "training_args.bin"]
    secrets = [FAKE_TOKEN, str(tmp_path_factory.getbasetemp()), str(tiny_checkpoint), str(out), str(Path.home())]
    for name, data in pushed.items():  # every byte, binaries included
        for secret in secrets:
            assert secret.encode() not in data, f"{name} holds {secret}"
    for path in out.rglob("*"):  # and the token is on no disk at all: checkpoints pickle their arguments
        assert not path.is_file() or FAKE_TOKEN.encode() not in path.read_bytes(), path


FRESH = """
import sys, torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
image = Image.open(sys.argv[1])
for ours, llava in zip(sys.argv[2::2], sys.argv[3::2]):
    answers = []
    for folder, remote in ((ours, True), (llava, False)):
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
        auto = AutoModelForCausalLM if remote else AutoModelForImageTextToText  # LLaVA: no remote code at all
        model = auto.from_pretrained(folder, trust_remote_code=remote).eval()
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        x = processor(images=[image], text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        answers.append((out.sequences[0, x["input_ids"].shape[1]:], out.logits[0][0]))
    assert torch.equal(answers[0][0], answers[1][0]), answers
    assert torch.allclose(answers[0][1], answers[1][1], atol=1e-4), (answers[0][1] - answers[1][1]).abs().max()
    print("SAME", type(model).__name__, answers[0][0].tolist())
"""


def test_the_scripts_train_and_their_results_load_with_the_auto_classes_and_export_to_llava(
    tiny_checkpoint, toy, tmp_path
):
    """`python train_dpo.py ...` and `python train_grpo.py ...` as a user runs them; then, in a fresh isolated
    process, each result loads with the Auto classes and its LLaVA export gives the same answers and logits."""
    from export_llava import main as export

    folders, env = [], {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for stage in ("dpo", "grpo"):
        args = stage_args(stage, tiny_checkpoint, toy, tmp_path / stage, "--learning_rate", "1e-2")
        run = subprocess.run([sys.executable, f"train_{stage}.py", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert changed(weights(tiny_checkpoint), weights(tmp_path / stage), "model.language_model.")
        folders += [str(tmp_path / stage), str(export(["--model", str(tmp_path / stage), "--output",
                                                      str(tmp_path / f"{stage}-llava")]))]  # fmt: skip
    shape_image("red", size=32).save(tmp_path / "red.png")
    (tmp_path / "fresh.py").write_text(FRESH)
    # -I: isolated, so the repo is not importable; the folders' own code and transformers' LLaVA are all there is
    cmd = [sys.executable, "-I", "fresh.py", str(tmp_path / "red.png"), *folders]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("SAME LlavaForConditionalGeneration") == 2


# ----------------------------------------------------------------------------- TRL's stock CLI


def test_trls_stock_cli_trains_our_checkpoint_with_trust_remote_code(tiny_checkpoint, toy, tmp_path):
    """`trl dpo` and `trl grpo`, TRL's own scripts, on our folder: remote code, TRL's collators, our rewards by
    dotted path (TRL imports them from the working directory, the repo root). Data: a Hub-layout parquet folder."""
    import datasets

    pairs = load_pairs(str(toy["pairs"]))
    rows = [pairs[i] for i in range(4)]
    text = lambda turns: [{"role": m["role"], "content": m["content"][-1]["text"]} for m in turns]  # noqa: E731
    columns = {"prompt": [text(r["prompt"]) for r in rows], "images": [r["images"] for r in rows]}
    preference = {
        **columns,
        "chosen": [text(r["chosen"]) for r in rows],
        "rejected": [text(r["rejected"]) for r in rows],
    }
    prompts = {**columns, "solution": [r["chosen"][0]["content"][0]["text"] for r in rows]}
    for name, data in (("dpo", preference), ("grpo", prompts)):
        ds = datasets.Dataset.from_dict(data).cast_column("images", datasets.Sequence(datasets.Image()))
        (tmp_path / name / "data").mkdir(parents=True)
        ds.to_parquet(str(tmp_path / name / "data" / "train-00000-of-00001.parquet"))
    common = ["--model_name_or_path", str(tiny_checkpoint), "--trust_remote_code", "--max_steps", "1", "--use_cpu",
              "--bf16", "false", "--report_to", "none", "--activation_checkpointing", "false"]  # fmt: skip
    grpo = [
        "--num_generations",
        "2",
        "--max_completion_length",
        "4",
        "--reward_funcs",
        "qwen_siglip.rewards.exact_match",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    trl = str(Path(sys.executable).parent / "trl")
    for stage, extra in (("dpo", []), ("grpo", grpo)):
        cmd = [trl, stage, "--dataset_name", str(tmp_path / stage), "--output_dir", str(tmp_path / f"{stage}-out"),
               "--per_device_train_batch_size", "2", *common, *extra]  # fmt: skip
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert (tmp_path / f"{stage}-out" / "model.safetensors").is_file()


def test_grpo_global_batch_sets_one_generation_round_per_optimizer_step(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = ["--output_dir", "x", "--use_cpu", "true", "--per_device_train_batch_size", "4", "--num_generations", "4"]
    _, args, _ = training.parse_args("grpo", stage3.with_accumulation([*common, "--global_batch_size", "16"]))
    assert (args.gradient_accumulation_steps, args.steps_per_generation, args.generation_batch_size) == (4, 4, 16)
    explicit = [*common, "--global_batch_size", "16", "--steps_per_generation", "2"]
    _, args, _ = training.parse_args("grpo", stage3.with_accumulation(explicit))
    assert (args.gradient_accumulation_steps, args.steps_per_generation, args.generation_batch_size) == (4, 2, 8)


@pytest.mark.parametrize("flag", ["--group_by_length", "--padding_free"])
def test_stage_1_and_2_batching_is_refused_before_anything_loads(flag, tmp_path):
    argv = ["--model_name_or_path", str(tmp_path / "never-loaded"), "--dataset_name", "x.jsonl", "--output_dir",
            str(tmp_path), "--use_cpu", "true", "--bf16", "false", flag, "true"]  # fmt: skip
    with pytest.raises(ValueError, match=flag.removeprefix("--")):
        stage3.build_trainer("dpo", argv)
