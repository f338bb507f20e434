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
- Images over `--max-image-pixels` are refused from their header, before being decoded; the upload itself is
  capped by Gradio's `max_file_size`. Refusals and failures show in a status line on the page; the server lives on.
- Private and offline by default: binds 127.0.0.1, no share link, no Gradio analytics or version check (these would
  reach the network), bundled fonts only.
- Gradio is an optional extra, so training does not need it.
"""

import argparse
import os
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, StoppingCriteria, TextIteratorStreamer

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


def load(model_path: str) -> tuple[torch.nn.Module, AutoProcessor]:
    """Load model and processor once; bf16 on a GPU, float32 on the CPU."""
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        model_path, trust_remote_code=True, dtype=torch.bfloat16 if cuda else torch.float32
    )
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    return model.to("cuda" if cuda else "cpu").eval(), processor


def open_image(path: str, max_pixels: int) -> Image.Image:
    """Open an uploaded image as RGB; ValueError if it has more than `max_pixels` pixels."""
    with Image.open(path) as img:  # lazy: only the header is read so far, so a huge image costs nothing to refuse
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(
                f"This image is too large: {width}×{height} = {width * height:,} pixels; "
                f"the limit is {max_pixels:,}. Please use a smaller image."
            )
        return img.convert("RGB")


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


def stream_answer(model, processor, messages: list[dict], image: Image.Image, **generate_kwargs) -> Iterator[str]:
    """Yield the answer so far as tokens arrive; `generate` runs in a thread (KV cache on) and feeds a streamer."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, return_tensors="pt").to(model.device)
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


def build_app(model_path: str, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> gr.Blocks:
    """Load the model once and lay out the chat; `.launch()` the result to serve it."""
    model, processor = load(model_path)

    def check_image(path: str | None) -> str:
        """Say at once, in the status line, if a new image will be refused (each question checks it again)."""
        try:
            if path is not None:
                open_image(path, max_image_pixels)
        except Exception as e:  # too large, or not an image PIL can read
            return f"⚠️ {e}"
        return ""

    def respond(
        question: str, history: list[dict], path: str | None, temperature: float, top_p: float, max_new_tokens: int
    ) -> Iterator[tuple[str, list[dict], str]]:
        """Stream the answer into the chat; outputs are (question box, chat, status line)."""
        question = question.strip()
        if not question:
            yield "", history, ""
            return
        try:
            if path is None:
                raise ValueError("Upload or paste an image first.")
            image = open_image(path, max_image_pixels)
            messages = chat_messages(history, question)
            kwargs = sampling_kwargs(temperature, top_p, max_new_tokens)
            chat = [*history, {"role": "user", "content": question}]
            yield "", chat, ANSWERING  # the question shows during prefill
            # closing(): when Stop cancels this generator, the stream's own cleanup ends the generation thread.
            with closing(stream_answer(model, processor, messages, image, **kwargs)) as stream:
                for answer in stream:
                    chat = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                    yield gr.skip(), chat, ANSWERING  # skip: the next question may already be being typed
            yield gr.skip(), chat, ""  # the empty status line says the answer is complete
        except ValueError as e:  # no image, image too large: the question stays in its box, to ask again
            yield question, history, f"⚠️ {e}"
        except Exception as e:  # anything else shows on the page too, instead of ending the server
            yield question, history, f"⚠️ Generation failed: {type(e).__name__}: {e}"

    # A local folder is named by its last two parts: the page (and its screenshots) need no path of this machine.
    name = "/".join(Path(model_path).resolve().parts[-2:]) if Path(model_path).exists() else model_path
    with gr.Blocks(title="qwen-siglip chat", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## qwen-siglip chat\n`{name}` · Upload or paste an image, then ask about it in English or "
            "Chinese (中文). Follow-up questions are about the same image; a new image starts a new conversation."
        )
        with gr.Row():
            with gr.Column(scale=2):
                # filepath + image_mode=None: Gradio hands over the uploaded file undecoded, so open_image can
                # refuse a huge one from its header.
                image = gr.Image(
                    type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image", elem_id="image"
                )
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
    launch(build_app(args.model, max_image_pixels=args.max_image_pixels), args.host, args.port, args.share)


if __name__ == "__main__":
    main()
