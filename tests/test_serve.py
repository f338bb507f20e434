"""Serving: the LLaVA export behind `transformers serve`, asked through the `openai` client with a base64 image.

Our own checkpoint folder cannot be served this way: `transformers serve` resolves `architectures[0]` as an attribute
of the transformers package and decides the modality from built-in class names, so remote code (`auto_map`) is never
consulted, even with `--trust-remote-code`. The export is plain LLaVA and is served as it is.
"""

import base64
import io
import os
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
import torch
from conftest import free_port, shape_image, stop, user_turn

from qwen_siglip.llava import export

QUESTION = "What colour is the shape?"
MAX_NEW_TOKENS = 12
READY_TIMEOUT_S = 60  # the tiny export is up in about 8 s on 2 busy CPU cores


def wait_until_ready(server: subprocess.Popen, url: str, log_path) -> None:
    """Poll `/health` until it answers; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"transformers serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except OSError:  # not listening yet
            time.sleep(0.25)
    pytest.fail(f"transformers serve was not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    """(client, model name): `transformers serve` on the exported tiny checkpoint, on 127.0.0.1, offline."""
    work = tmp_path_factory.mktemp("serve")
    folder = str(export(tiny_checkpoint, work / "llava"))
    port, log_path = free_port(), work / "serve.log"
    # `python -m transformers.cli.transformers` is the `transformers` command, from this interpreter.
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", folder]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(server, url, log_path)
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=30, max_retries=0), folder
    finally:
        stop(server)


def as_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server decodes the very pixels we give our model
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(served, image) -> openai.types.chat.ChatCompletion:
    client, model = served
    content = [{"type": "image_url", "image_url": {"url": as_data_url(image)}}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_NEW_TOKENS)


def greedy(tiny, image) -> list[int]:
    """Our own model's greedy answer (token ids) to the same chat."""
    model, processor = tiny
    prompt = processor.apply_chat_template(user_turn(QUESTION), add_generation_prompt=True)
    x = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, x["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("color", ["red", "blue"])
def test_served_export_answers_openai_chat_with_image_as_our_greedy_generate(served, tiny, color):
    image = shape_image(color)
    expected = greedy(tiny, image)
    answer = ask(served, image)
    _, processor = tiny
    assert len(set(expected)) > 1  # a varied answer, so agreement is not a coincidence
    assert answer.choices[0].message.content == processor.decode(expected, skip_special_tokens=True)
    # The usage count is of generated ids, stop token included, as ours.
    assert answer.usage.completion_tokens == len(expected)


def test_served_answer_depends_on_the_image(served):
    """The image reaches the model: two images, two answers (each also equals greedy decoding, above)."""
    red, blue = (ask(served, shape_image(c)).choices[0].message.content for c in ("red", "blue"))
    assert red != blue
