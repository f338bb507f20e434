"""A Gradio chat with a QwenSiglip checkpoint: upload or paste an image and ask about it, in English or Chinese.

    pip install ".[app]"
    python app.py --model <folder or Hub id>      # then open http://127.0.0.1:7860

Notable:
- The model and processor are loaded once, when the app is built; every request reuses them. Gradio queues the
  requests and runs one generation at a time, which is what one CPU or GPU can serve.
- Answers stream token by token: `generate` (KV cache on) runs in a thread and feeds a `TextIteratorStreamer`.
  Stop (or closing the tab) ends the generation through a stopping criterion, freeing the model for the next user.
- The conversation is what the page shows: the image and the chat are sent with every question, and the whole chat
  is rendered with the processor's chat template, the image in the first user turn. No server-side session state,
  so a Clear or a new image (which empties the chat in the browser) can never race a question.
- The status line reads "Answering…" until an answer is complete. A question sent before then is asked right after
  it (Gradio's default would drop it); Clear during an answer is undone by the answer's next piece: Stop first.
- Temperature 0 means greedy decoding; above 0, temperature + top-p sampling.
- Images are opened by the data module's `load_rgb`, as in training (EXIF orientation, alpha on white, 16-bit
  rescaled). The image component hands the upload over undecoded (`image_input`): Gradio's own preprocessing
  would open it with PIL and fail on a corrupt file or a 400-megapixel header with its raw error, before the app
  could refuse it. Images over `--max-image-pixels` are refused from their header; the upload itself is capped by
  Gradio's `max_file_size`. Refusals and failures show in a status line on the page; the server lives on.
- No message names a path of the server (`without_paths`): PIL and friends put the upload's temporary path in theirs.
- A chat longer than the model's context is refused with a message before anything is generated; the answer's
  length is capped to what the context has left.
- `--model` may be a local folder (its code runs: it is yours) or a Hub id, which needs `--trust_remote_code`
  (`--revision` pins the commit whose code you read).
- Private and offline by default: binds 127.0.0.1, no share link, no Gradio analytics or version check (these would
  reach the network), bundled fonts only.
- Gradio is an optional extra, so training does not need it.
"""

import argparse
import base64
import os
import re
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import torch
from PIL import Image
from transformers import StoppingCriteria, TextIteratorStreamer

from data import ImageRefused, load_rgb
from evaluate import context_length, load_model, remote_code_allowed

# Must be set before gradio is imported: otherwise it phones home (telemetry, version check) on start.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:
    import gradio as gr
except ImportError as e:  # the trainer does not need Gradio, so it is an optional extra
    raise ImportError('The chat app needs Gradio: pip install ".[app]"') from e

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # a 50 MP photo; below PIL's own decompression-bomb guard (~89 MP)
MAX_FILE_SIZE = "50mb"
GENERATE_THREAD = "qwen-siglip-generate"
ANSWERING = "✍️ Answering… (Stop interrupts)"  # the status line while an answer is being written


class StopOnEvent(StoppingCriteria):
    """Ends `generate` once `event` is set: how a Stop click or a closed tab reaches the generation thread."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class PromptTooLong(ValueError):
    """The chat does not fit the model's context; the message says so and what to do."""


def load(model_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """Load model and processor once; bf16 on a GPU, float32 on the CPU. A Hub id needs `trust_remote_code`."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model, processor = load_model(model_path, trust_remote_code=trust_remote_code, revision=revision, dtype=dtype)
    return model.to("cuda" if cuda else "cpu"), processor


# An absolute POSIX or Windows path with at least one folder; not the `//host/x` of a URL, not `and/or`.
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"<>:]+[/\\])+")


def without_paths(message: str) -> str:
    """The message with every absolute path cut to its last part: '/tmp/gradio/ab12/cat.png' -> 'cat.png'."""
    return ABSOLUTE_PATH.sub("", message)


def open_image(src: str | bytes, max_pixels: int) -> Image.Image:
    """The uploaded image as RGB through the data module's `load_rgb`; ValueError with the app's own message."""
    try:
        return load_rgb(src, max_pixels=max_pixels)
    except ImageRefused as e:
        raise ValueError(f"This image cannot be used: {without_paths(str(e))}") from None


def message_text(message: dict) -> str:
    """The text of a chat message as the Chatbot sends it back (a string, or a list of content blocks)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)


def chat_messages(history: list[dict], question: str) -> list[dict]:
    """The chat shown on the page plus the new question, in the chat template's format, the image in turn one."""
    messages = [{"role": m["role"], "content": [{"type": "text", "text": message_text(m)}]} for m in history]
    messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
    messages[0]["content"].insert(0, {"type": "image"})  # the first message is always the user's
    return messages


def sampling_kwargs(temperature: float, top_p: float, max_new_tokens: int) -> dict:
    """`generate` settings; temperature 0 means greedy (passing top-p then would only draw a warning)."""
    if temperature <= 0:
        return dict(do_sample=False, max_new_tokens=int(max_new_tokens))
    return dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))


def encode(model, processor, messages: list[dict], image: Image.Image, max_new_tokens: int) -> tuple[dict, int]:
    """(model inputs, max_new_tokens capped to the context left); PromptTooLong if the prompt fills the context."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    n, context = inputs["input_ids"].shape[1], context_length(model)  # image tokens included
    if n >= context:
        raise PromptTooLong(
            f"This conversation is too long for the model ({n:,} tokens, limit {context:,}): start a new one "
            "(the bin icon clears the chat), or ask a shorter question."
        )
    return inputs.to(model.device), min(int(max_new_tokens), context - n)


def stream_answer(
    model, processor, messages: list[dict], image: Image.Image, *, max_new_tokens: int, **generate_kwargs
) -> Iterator[str]:
    """The answer so far, as tokens arrive; `generate` runs in a thread (KV cache on) and feeds a streamer.

    Not a generator itself: the prompt is encoded and checked at the call, so PromptTooLong comes before any answer.
    """
    inputs, max_new_tokens = encode(model, processor, messages, image, max_new_tokens)
    return _stream(model, processor, inputs, max_new_tokens=max_new_tokens, **generate_kwargs)


def _stream(model, processor, inputs: dict, **generate_kwargs) -> Iterator[str]:
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, failure = threading.Event(), []

    def run() -> None:
        try:
            model.generate(
                **inputs, streamer=streamer, use_cache=True, stopping_criteria=[StopOnEvent(stop)], **generate_kwargs
            )
        except Exception as e:  # re-raised below; ending the streamer keeps the loop below from waiting forever
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, name=GENERATE_THREAD, daemon=True)
    thread.start()
    answer = ""
    try:
        for piece in streamer:
            answer += piece
            yield answer
    finally:  # also reached when Gradio closes this generator (Stop, closed tab): end the generation with it
        stop.set()
    thread.join()
    if failure:
        raise failure[0]


def undecoded(payload) -> str | bytes | None:
    """An image upload as the app takes it: its file path, or the bytes of a pasted data URL; nothing decoded."""
    if payload is None:
        return None
    if payload.url and payload.url.startswith("data:"):
        return base64.b64decode(payload.url.partition(",")[2])
    return payload.path


def image_input(**kwargs) -> gr.Image:
    """A `gr.Image` that hands the upload over undecoded (`undecoded`), for `load_rgb` to open or refuse.

    Pitfall: `gr.Image`'s own preprocessing opens every upload with PIL, even with `type="filepath"`, so a corrupt
    file or a 400-megapixel header fails inside Gradio ("Could not preprocess input component", with the server's
    temporary path) before the app can refuse it with its own message. Its preprocessing is replaced on this
    instance; a subclass would do it too, but Gradio writes a stub file (app.pyi) next to any module defining one.
    """
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = undecoded
    return image


def build_app(
    model_path: str,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> gr.Blocks:
    """Load the model once and lay out the chat; `.launch()` the result to serve it."""
    model, processor = load(model_path, trust_remote_code, revision)

    def check_image(src: str | bytes | None) -> str:
        """Say at once, in the status line, if a new image will be refused (each question checks it again)."""
        try:
            if src is not None:
                open_image(src, max_image_pixels)
        except Exception as e:  # too large, or not an image we can read
            return f"⚠️ {without_paths(str(e))}"
        return ""

    def respond(
        question: str, history: list[dict], src: str | bytes | None, temperature: float, top_p: float, max_new_tokens
    ) -> Iterator[tuple[str, list[dict], str]]:
        """Stream the answer into the chat; outputs are (question box, chat, status line)."""
        question = question.strip()
        if not question:
            yield "", history, ""
            return
        try:
            if src is None:
                raise ValueError("Upload or paste an image first.")
            image = open_image(src, max_image_pixels)
            kwargs = sampling_kwargs(temperature, top_p, max_new_tokens)
            # the prompt is checked against the context here, before the question moves into the chat
            stream = stream_answer(model, processor, chat_messages(history, question), image, **kwargs)
            chat = [*history, {"role": "user", "content": question}]
            yield "", chat, ANSWERING  # the question shows during prefill
            # closing(): when Stop cancels this generator, the stream's own cleanup ends the generation thread.
            with closing(stream):
                for answer in stream:
                    chat = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                    yield gr.skip(), chat, ANSWERING  # skip: the next question may already be being typed
            yield gr.skip(), chat, ""  # the empty status line says the answer is complete
        except ValueError as e:  # no image, image refused, chat too long: the question stays in its box, to ask again
            yield question, history, f"⚠️ {without_paths(str(e))}"
        except Exception as e:  # anything else shows on the page too, instead of ending the server
            yield question, history, f"⚠️ Generation failed: {type(e).__name__}: {without_paths(str(e))}"

    # A local folder is named by its last two parts: the page (and its screenshots) need no path of this machine.
    name = "/".join(Path(model_path).resolve().parts[-2:]) if Path(model_path).exists() else model_path
    with gr.Blocks(title="qwen-siglip chat", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## qwen-siglip chat\n`{name}` · Upload or paste an image, then ask about it in English or "
            "Chinese (中文). Follow-up questions are about the same image; a new image starts a new conversation."
        )
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input(sources=["upload", "clipboard"], label="Image", elem_id="image")
                with gr.Accordion("Sampling settings", open=False):
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
            with gr.Column(scale=3):
                # No share button (it posts the chat to the Hub). Its bin icon clears the chat, in the browser.
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420, buttons=["copy", "copy_all"])
                question = gr.Textbox(
                    placeholder="Ask about the image… / 请问图片里有什么？", show_label=False, elem_id="question"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                status = gr.Markdown(elem_id="status")

        # A new (or removed) image starts a new conversation: the chat is emptied in the browser itself (js, no
        # server round trip), so a question asked right after an upload can never carry the old chat.
        image.change(None, outputs=chatbot, js="() => [[]]")  # js returns one value per output
        image.change(check_image, inputs=image, outputs=status)
        # Enter and Send ask the same way, sharing one queue slot (one generation at a time); Stop cancels either.
        ask = dict(
            fn=respond,
            inputs=[question, chatbot, image, temperature, top_p, max_new_tokens],
            outputs=[question, chatbot, status],
            concurrency_id="generate",
            # Pitfall: Gradio's default ("once") silently drops a question sent while an answer is still
            # finishing; "always_last" asks it right after instead.
            trigger_mode="always_last",
        )
        asks = [question.submit(**ask), send.click(**ask)]
        stop.click(lambda: "", outputs=status, cancels=asks)  # a stopped answer is no longer being written
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint folder or a Hub id")
    parser.add_argument("--trust_remote_code", action="store_true", help="needed for a Hub id: runs its code")
    parser.add_argument("--revision", default=None, help="the Hub commit (or branch/tag) to load")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves every network interface")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (needs network)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    return parser.parse_args(argv)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, **kwargs):
    """Serve the app with this project's defaults; extra `kwargs` go to `Blocks.launch` (tests pass their own)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_FILE_SIZE,
        ssr_mode=False,  # server-side rendering needs Node.js and a second server; plain serving does not
        show_error=True,  # an unexpected exception becomes a message on the page
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        remote_code_allowed(args.model, args.trust_remote_code)  # before any download
    except ValueError as e:
        raise SystemExit(f"app.py: error: {e}") from None
    options = dict(trust_remote_code=args.trust_remote_code, revision=args.revision)
    demo = build_app(args.model, max_image_pixels=args.max_image_pixels, **options)
    launch(demo, args.host, args.port, args.share)


if __name__ == "__main__":
    main()
