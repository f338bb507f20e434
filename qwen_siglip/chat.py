"""The chat engine behind the app: a checkpoint's answers to a chat about one image, streamed as they are written.

No Gradio here: the app (`app.py`) lays out the page and calls these.

Notable:
- The conversation is what the page shows: the whole chat is rendered with the processor's chat template, the
  image in the first user turn; no server-side session state.
- Answers stream token by token: `generate` (KV cache on) runs in a thread and feeds a `TextIteratorStreamer`;
  closing the stream (Stop, a closed tab) ends the generation through a stopping criterion.
- A chat longer than the model's context is refused (`PromptTooLong`) before anything is generated; the answer's
  length is capped to what the context has left.
- Images are opened by `images.load_rgb`, as in training; refusals become the app's own message, and no message
  names a path of the server (`without_paths`): PIL and friends put the upload's temporary path in theirs.
- Temperature 0 means greedy decoding; above 0, temperature + top-p sampling.
"""

import re
import threading
from collections.abc import Iterator

import torch
from PIL import Image
from transformers import StoppingCriteria, TextIteratorStreamer

from qwen_siglip.images import ImageRefused, load_rgb
from qwen_siglip.inference import context_length, load_model

GENERATE_THREAD = "qwen-siglip-generate"


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
