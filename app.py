"""A Gradio chat with a QwenSiglip checkpoint: upload or paste an image and ask about it, in English or Chinese.

    pip install ".[app]"
    python app.py --model <folder or Hub id>      # then open http://127.0.0.1:7860

Notable (the chat engine, with no Gradio in it, is `qwen_siglip.chat`):
- The model and processor are loaded once, when the app is built; every request reuses them. Gradio queues the
  requests and runs one generation at a time, which is what one CPU or GPU can serve.
- Stop (or closing the tab) ends the generation, freeing the model for the next user.
- The image and the chat are sent with every question: a Clear or a new image (which empties the chat in the
  browser) can never race a question.
- The status line reads "Answering…" until an answer is complete. A question sent before then is asked right after
  it (Gradio's default would drop it); Clear during an answer is undone by the answer's next piece: Stop first.
- The image component hands the upload over undecoded (`image_input`): Gradio's own preprocessing would open it
  with PIL and fail on a corrupt file or a 400-megapixel header with its raw error, before the app could refuse it.
  Images over `--max-image-pixels` are refused from their header; the upload itself is capped by Gradio's
  `max_file_size`. Refusals and failures show in a status line on the page; the server lives on.
- `--model` may be a local folder (its code runs: it is yours) or a Hub id, which needs `--trust_remote_code`
  (`--revision` pins the commit whose code you read).
- Private and offline by default: binds 127.0.0.1, no share link, no Gradio analytics or version check (these would
  reach the network), bundled fonts only. Gradio is an optional extra, so training does not need it.
"""

import argparse
import base64
import os
from collections.abc import Iterator
from contextlib import closing

from qwen_siglip.chat import chat_messages, load, open_image, sampling_kwargs, stream_answer, without_paths
from qwen_siglip.hub import display_name
from qwen_siglip.inference import remote_code_allowed

# Must be set before gradio is imported: otherwise it phones home (telemetry, version check) on start.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:
    import gradio as gr
except ImportError as e:  # the trainer does not need Gradio, so it is an optional extra
    raise ImportError('The chat app needs Gradio: pip install ".[app]"') from e

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # a 50 MP photo; below PIL's own decompression-bomb guard
MAX_FILE_SIZE = "50mb"
ANSWERING = "✍️ Answering… (Stop interrupts)"  # the status line while an answer is being written


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


def check_image(src: str | bytes | None, max_image_pixels: int) -> str:
    """The status line for a new image: a warning now if it will be refused (each question checks it again)."""
    try:
        if src is not None:
            open_image(src, max_image_pixels)
    except Exception as e:  # too large, or not an image we can read
        return f"⚠️ {without_paths(str(e))}"
    return ""


def responder(model, processor, max_image_pixels: int):
    """The function a question runs: streams the answer into the chat; outputs are (question box, chat, status)."""

    def respond(
        question: str, history: list[dict], src: str | bytes | None, temperature: float, top_p: float, max_new_tokens
    ) -> Iterator[tuple[str, list[dict], str]]:
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

    return respond


def layout(name: str) -> dict:
    """The page's components, by name; call inside a `gr.Blocks` context."""
    gr.Markdown(
        f"## qwen-siglip chat\n`{name}` · Upload or paste an image, then ask about it in English or "
        "Chinese (中文). Follow-up questions are about the same image; a new image starts a new conversation."
    )
    ui = {}
    with gr.Row():
        with gr.Column(scale=2):
            ui["image"] = image_input(sources=["upload", "clipboard"], label="Image", elem_id="image")
            with gr.Accordion("Sampling settings", open=False):
                ui["temperature"] = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                ui["top_p"] = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                ui["max_new_tokens"] = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
        with gr.Column(scale=3):
            # No share button (it posts the chat to the Hub). Its bin icon clears the chat, in the browser.
            ui["chatbot"] = gr.Chatbot(label="Chat", elem_id="chatbot", height=420, buttons=["copy", "copy_all"])
            ui["question"] = gr.Textbox(
                placeholder="Ask about the image… / 请问图片里有什么？", show_label=False, elem_id="question"
            )
            with gr.Row():
                ui["send"] = gr.Button("Send", variant="primary", elem_id="send")
                ui["stop"] = gr.Button("Stop", elem_id="stop")
            ui["status"] = gr.Markdown(elem_id="status")
    return ui


def wire(ui: dict, respond, max_image_pixels: int) -> None:
    """Connect the page's events: a new image empties the chat; Enter or Send asks; Stop cancels."""
    image, chatbot, status = ui["image"], ui["chatbot"], ui["status"]
    # A new (or removed) image starts a new conversation: the chat is emptied in the browser itself (js, no
    # server round trip), so a question asked right after an upload can never carry the old chat.
    image.change(None, outputs=chatbot, js="() => [[]]")  # js returns one value per output
    image.change(lambda src: check_image(src, max_image_pixels), inputs=image, outputs=status)
    # Enter and Send ask the same way, sharing one queue slot (one generation at a time); Stop cancels either.
    ask = dict(
        fn=respond,
        inputs=[ui[k] for k in ("question", "chatbot", "image", "temperature", "top_p", "max_new_tokens")],
        outputs=[ui["question"], chatbot, status],
        concurrency_id="generate",
        # Pitfall: Gradio's default ("once") silently drops a question sent while an answer is still
        # finishing; "always_last" asks it right after instead.
        trigger_mode="always_last",
    )
    asks = [ui["question"].submit(**ask), ui["send"].click(**ask)]
    ui["stop"].click(lambda: "", outputs=status, cancels=asks)  # a stopped answer is no longer being written


def build_app(
    model_path: str,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> gr.Blocks:
    """Load the model once and lay out the chat; `.launch()` the result to serve it."""
    model, processor = load(model_path, trust_remote_code, revision)
    with gr.Blocks(title="qwen-siglip chat", analytics_enabled=False) as demo:
        ui = layout(display_name(model_path))  # a local folder by its name: the page names no path of this machine
        wire(ui, responder(model, processor, max_image_pixels), max_image_pixels)
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
    from qwen_siglip.cli import run

    run(main)
