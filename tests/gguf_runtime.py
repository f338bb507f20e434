"""The real llama.cpp runtime (llama-cpp-python's bindings, server and stock `MTMDChatHandler`) for the GGUF tests.

Nothing here changes how llama.cpp runs: files are loaded with their defaults, chats go through the stock handler
or the stock server, and image embeddings are read with mtmd's own C API (tokenize, encode, output embeddings).
"""

import base64
import contextlib
import ctypes
import io
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from conftest import free_port, stop

# One thread: the tiny models gain nothing from more, and llama.cpp's threads spin-wait for each other, which on a
# machine busy with other jobs costs far more than it saves.
THREADS = 1
READY_TIMEOUT_S = 120


def quiet_llama_logs() -> None:
    """llama.cpp's and mtmd's logs: warnings and errors only (the export's own filter)."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    from qwen_siglip.gguf_export import warnings_only_log

    llama_cpp.llama_log_set(warnings_only_log(), ctypes.c_void_p(0))
    mtmd.mtmd_log_set(warnings_only_log(), ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(warnings_only_log(), ctypes.c_void_p(0))


@contextlib.contextmanager
def llama(model_path: Path, mmproj: Path | None = None, **kwargs):
    """A `Llama` on `model_path` (with the stock MTMDChatHandler when `mmproj` is given), closed on exit."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    quiet_llama_logs()
    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False, use_gpu=False) if mmproj else None
    args = dict(n_ctx=1024, n_threads=THREADS, n_threads_batch=THREADS, verbose=False, seed=0) | kwargs
    llm = Llama(str(model_path), chat_handler=handler, **args)
    try:
        yield llm
    finally:
        llm.close()


def data_url(image) -> str:
    """A lossless PNG data URL: llama.cpp decodes the very pixels our processor gets."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(messages: list[dict], images: list) -> list[dict]:
    """Our chat messages ({"type": "image"} items, images apart) as OpenAI messages with base64 `image_url` items."""
    images, out = iter(images), []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            image = lambda: {"type": "image_url", "image_url": {"url": data_url(next(images))}}  # noqa: E731
            content = [image() if item["type"] == "image" else item for item in content]
        out.append({"role": message["role"], "content": content})
    return out


def chat_answer(llm, messages: list[dict], images: list, max_tokens: int, **kwargs) -> str:
    """Greedy answer of the stock chat handler to our messages."""
    out = llm.create_chat_completion(
        openai_messages(messages, images), temperature=0.0, max_tokens=max_tokens, seed=0, **kwargs
    )
    return out["choices"][0]["message"]["content"]


def image_embeddings(llm, mmproj: Path, image) -> np.ndarray:
    """(n_image_tokens, n_embd): what llama.cpp's mtmd puts into the LM for `image` (an RGB PIL image)."""
    import llama_cpp.mtmd_cpp as mtmd

    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, THREADS, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx, f"mtmd could not load {mmproj.name}"
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb))
    text = mtmd.mtmd_input_text()
    text.text = mtmd.mtmd_default_marker()
    text.text_len, text.add_special, text.parse_special = len(text.text), False, True
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        kinds = [mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
                 for i in range(mtmd.mtmd_input_chunks_size(chunks))]  # fmt: skip
        chunk = mtmd.mtmd_input_chunks_get(chunks, kinds.index(mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE))
        n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
        flat = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * llm.n_embd(),))
        return flat.reshape(n, llm.n_embd()).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)


def our_image_features(model, processor, image) -> np.ndarray:
    """(n_image_tokens, n_embd): what our model puts into the LM for `image`."""
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixel_values).pooler_output[0].float().numpy()


@contextlib.contextmanager
def llama_cpp_server(model_path: Path, mmproj: Path, log_path: Path):
    """llama-cpp-python's OpenAI-compatible server (stock `mtmd` chat format) on 127.0.0.1; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--clip_model_path", str(mmproj),
           "--chat_format", "mtmd", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024",
           "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--verbose", "false"]  # fmt: skip
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if server.poll() is not None:
                log = log_path.read_text()[-3000:]
                raise RuntimeError(f"llama_cpp.server exited with {server.returncode}:\n{log}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=1):
                    break
            except OSError:  # not listening yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server not ready:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.25)
        yield url
    finally:
        stop(server)
