"""How the commands end on an error (`qwen_siglip/cli.py`): a user's mistake prints its message alone and exits 1;
a bug, or any error under QWEN_SIGLIP_DEBUG=1, prints its traceback.

Each command runs here as a user runs it, `python <command>.py ...` in its own process, on one bad input.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import CPU_RUN, ROOT

from qwen_siglip import cli


def command(script: str, *args, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_VARIABLE}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | ({cli.DEBUG_VARIABLE: "1"} if debug else {})
    cmd = [sys.executable, script, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def user_error(result: subprocess.CompletedProcess, script: str) -> str:
    """The message the command ended with; fails unless it exited 1 with that message last and no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    prefix = f"{script}: error: "
    assert prefix in result.stderr, result.stderr[-3000:]
    return result.stderr[result.stderr.rindex(prefix) + len(prefix) :].rstrip("\n")  # nothing follows it


def llava(image: str) -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square."}]
    return {"image": image, "conversations": turns}


# ----------------------------------------------------------------------------- the wrapper itself


def raising(error: BaseException):
    def main():
        raise error

    return main


def test_a_user_error_prints_the_message_alone_and_exits_1(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "argv", ["train_sft.py"])
    for error in (ValueError("data file d.json: invalid JSON"), FileNotFoundError("data file d.json not found")):
        with pytest.raises(SystemExit) as caught:
            cli.run(raising(error))
        assert caught.value.code == 1
        assert capsys.readouterr().err == f"train_sft.py: error: {error}\n"


def test_a_bug_keeps_its_traceback_and_debug_shows_every_traceback(monkeypatch, capsys):
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    for bug in (TypeError("'bool' object is not iterable"), KeyError("answer"), RuntimeError("shape mismatch")):
        with pytest.raises(type(bug)):
            cli.run(raising(bug))
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(ValueError, match="bad value"):
        cli.run(raising(ValueError("bad value")))
    assert capsys.readouterr().err == ""


def test_ctrl_c_says_interrupted_and_exits_130(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "argv", ["app.py"])
    with pytest.raises(SystemExit) as caught:
        cli.run(raising(KeyboardInterrupt()))
    assert caught.value.code == 130 and capsys.readouterr().err == "app.py: interrupted\n"


# ----------------------------------------------------------------------------- every command, as a user runs it


def test_training_on_data_with_no_usable_record_stops_with_one_message(tiny_bases, tiny_checkpoint, tmp_path):
    """Both stages. Before: a bare StopIteration from inside TRL's SFTTrainer, exit status 1 and no message."""
    (tmp_path / "zero.json").write_text(json.dumps([llava("/dev/zero")]))
    (tmp_path / "empty.jsonl").write_text("")
    run = [*CPU_RUN, "--max_steps", "1", "--output_dir", tmp_path / "out"]
    bases = ["--vision_model", tiny_bases[0], "--text_model", tiny_bases[1]]
    result = command("train_pretrain.py", *bases, *run, "--dataset_name", tmp_path / "zero.json")
    message = user_error(result, "train_pretrain.py")
    assert message.startswith(f"no usable records in {tmp_path / 'zero.json'}: 1 skipped (image_outside_root=1)")
    assert message.endswith(
        "zero.json record 0: field 'image': file '/dev/zero' is outside the image root [image_outside_root]"
    )
    sft = ["--model_name_or_path", tiny_checkpoint, *run, "--dataset_name", tmp_path / "empty.jsonl"]
    message = user_error(command("train_sft.py", *sft), "train_sft.py")
    assert message == f"no usable records in {tmp_path / 'empty.jsonl'}: it holds no records"


@pytest.mark.parametrize("script", ["train_dpo.py", "train_grpo.py"])
def test_stage_3_on_data_with_no_usable_record_stops_with_one_message(script, tiny_checkpoint, tmp_path):
    """Stage 3 loads through the same function, so it refuses an empty set the same way, before any trainer."""
    (tmp_path / "empty.jsonl").write_text("")
    cpu = [a for a in map(str, CPU_RUN) if a not in ("--max_length", "256")]  # GRPOConfig has no max_length
    args = ["--model_name_or_path", tiny_checkpoint, *cpu, "--max_steps", "1", "--output_dir", tmp_path / "out"]
    args += ["--num_generations", "2"] if script == "train_grpo.py" else []  # a batch of 4 holds 2 prompts x 2
    message = user_error(command(script, *args, "--dataset_name", tmp_path / "empty.jsonl"), script)
    assert message == f"no usable records in {tmp_path / 'empty.jsonl'}: it holds no records"


def test_training_with_a_missing_checkpoint_or_a_bad_flag_value_prints_the_message(tmp_path):
    result = command("train_sft.py", "--model_name_or_path", tmp_path / "no-such-run", "--dataset_name", "d.json",
                     *CPU_RUN, "--output_dir", tmp_path / "out")  # fmt: skip
    assert "no-such-run" in user_error(result, "train_sft.py")
    bad_flags = ["--dataset_streaming", "true", "--dataset_name", "d.json", *CPU_RUN, "--output_dir", tmp_path / "out"]
    needs = "--dataset_streaming needs --max_steps: a stream has no length to count epochs by"
    assert user_error(command("train_sft.py", *bad_flags), "train_sft.py") == needs
    debug = command("train_sft.py", *bad_flags, debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and needs in debug.stderr
    typo = command("train_sft.py", "--max_steps", "ten")  # argparse's own error: usage and message, exit 2
    assert typo.returncode == 2 and "Traceback" not in typo.stderr and "invalid int value: 'ten'" in typo.stderr


def test_evaluate_on_a_file_that_is_not_utf8_prints_the_message(tiny_checkpoint, tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"caption": "caf\xe9"}\n')
    result = command("evaluate_vlm.py", "--model", tiny_checkpoint, "--dataset", tmp_path / "latin1.jsonl")
    message = user_error(result, "evaluate_vlm.py")
    assert message.endswith("latin1.jsonl: byte 0xe9 at line 1 is not UTF-8; save the file as UTF-8")


def test_evaluate_with_zero_usable_examples_fails_and_leaves_the_card_alone(tiny_checkpoint, tmp_path):
    """Before: exit 0, "exact match 0.0% | 0 examples", and the card updated with it."""
    import shutil

    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / "README.md").write_text("# my card\n")
    (tmp_path / "zero.json").write_text(json.dumps([llava("nope.png")]))
    result = command("evaluate_vlm.py", "--model", model, "--dataset", tmp_path / "zero.json", "--write_card")
    assert user_error(result, "evaluate_vlm.py").startswith(
        f"no usable records in {tmp_path / 'zero.json'}: 1 skipped"
    )
    assert (model / "README.md").read_text() == "# my card\n" and not (model / "eval").exists()


def test_evaluate_refuses_when_every_example_is_skipped_at_evaluation(tiny_checkpoint, tmp_path):
    """Examples that load but cannot be scored (every prompt past the context) are no result either."""
    from PIL import Image

    import evaluate_vlm

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    record = llava("a.png")
    record["conversations"][0]["value"] += " why" * 3000  # past the tiny model's context
    (tmp_path / "long.json").write_text(json.dumps([record]))
    argv = ["--model", str(tiny_checkpoint), "--dataset", str(tmp_path / "long.json"), "--output_dir", str(tmp_path)]
    words = r"no example of .*long\.json could be evaluated: skipped \{'prompt_too_long': 1\}"
    with pytest.raises(ValueError, match=words):
        evaluate_vlm.main(argv)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("script", ["export_llava.py", "export_gguf.py"])
def test_export_of_a_missing_checkpoint_prints_the_message(script, tmp_path):
    result = command(script, "--model", tmp_path / "no-such-model", "--output", tmp_path / "out")
    assert "no-such-model" in user_error(result, script)


def test_app_start_up_on_a_hub_id_it_cannot_reach_prints_the_message(tmp_path):
    """A Hub refusal (offline here: huggingface_hub's errors are OSErrors) at app start-up."""
    pytest.importorskip("gradio")
    result = command("app.py", "--model", "someone/no-such-model", "--trust_remote_code")
    assert "couldn't find them in the cached files" in user_error(result, "app.py")  # transformers' own words
