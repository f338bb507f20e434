"""The chat app: its helpers directly, then end to end in headless Chromium, used as a person would use it.

The browser tests start the app on the embedded default's trained checkpoint, upload a PNG, ask in English and in
Chinese, and compare the streamed answers on the page with greedy `generate` on the same weights. They need
Debian's Chromium (`apt-get install -y chromium`) and Playwright (`pip install playwright`; its own browser
download is not used). Set QWEN_SIGLIP_SCREENSHOT=docs/app.png to save a screenshot mid-conversation.
"""

import base64
import inspect
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, free_port, shape_image

import app
from qwen_siglip import chat

CHROMIUM = "/usr/bin/chromium"
# Chromium's own background traffic (updates, sync, field trials) is refused by a closed network; keep it off.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # a 2-core CI machine shared with other jobs can be slow to prefill
LIMIT = 256 * 256  # the browser app's --max-image-pixels: a 192 px image passes, a 300 px one is refused


def greedy(model, processor, messages: list[dict], image, max_new_tokens: int) -> str:
    """The reference answer, computed without the app's code."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    x = processor(images=[image], text=text, return_tensors="pt")
    out = model.generate(**x, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.tokenizer.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True)


def user(text: str, image: bool = False) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}


# --- helpers, no browser ---------------------------------------------------------------------------------------


def test_defaults_are_private_and_offline():
    args = app.parse_args(["--model", "some/model"])
    assert (args.host, args.share, args.max_image_pixels) == ("127.0.0.1", False, app.DEFAULT_MAX_IMAGE_PIXELS)
    assert (args.trust_remote_code, args.revision) == (False, None)  # a Hub id's code runs only when asked
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_temperature_zero_is_greedy():
    assert chat.sampling_kwargs(0, 0.9, 5) == dict(do_sample=False, max_new_tokens=5)
    assert chat.sampling_kwargs(0.7, 0.9, 5) == dict(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=5)


def test_chat_messages_follow_the_page_and_put_the_image_in_the_first_turn():
    history = [  # as Gradio's Chatbot sends its value back: content as a list of blocks
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}], "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}], "metadata": None},
    ]
    assert chat.chat_messages(history, "它是什么颜色？") == [
        user("What is it?", image=True),
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        user("它是什么颜色？"),
    ]
    assert chat.chat_messages([], "Hi") == [user("Hi", image=True)]


def test_open_image_refuses_too_many_pixels(tmp_path):
    shape_image(size=256).save(tmp_path / "ok.png")
    shape_image(size=300).save(tmp_path / "big.png")
    assert chat.open_image(str(tmp_path / "ok.png"), LIMIT).size == (256, 256)
    with pytest.raises(ValueError, match=r"^This image cannot be used: .*300\D+300.*65,?536"):
        chat.open_image(str(tmp_path / "big.png"), LIMIT)


def test_the_app_opens_images_as_training_does(tmp_path):
    """EXIF orientation applied and alpha on white, exactly as the data module's `load_rgb` gives them."""
    import numpy as np
    from PIL import Image

    from qwen_siglip.images import load_rgb

    photo = shape_image(size=64, box=(0, 0, 63, 15)).resize((64, 32))  # wider than tall
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    photo.save(tmp_path / "rotated.jpg", exif=exif)
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent: must show as white, not black
    rgba.save(tmp_path / "clear.png")
    assert chat.open_image(str(tmp_path / "rotated.jpg"), LIMIT).size == (32, 64)
    assert chat.open_image(str(tmp_path / "clear.png"), LIMIT).getpixel((0, 0)) == (255, 255, 255)
    for name in ("rotated.jpg", "clear.png"):
        path = str(tmp_path / name)
        assert np.array_equal(np.asarray(chat.open_image(path, LIMIT)), np.asarray(load_rgb(path, max_pixels=LIMIT)))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels: an image bomb costs its sender a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


CORRUPT_JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8  # a JPEG's first bytes, then noise


@pytest.mark.parametrize("name", ["bomb.png", "corrupt.jpg", "truncated.jpg"])
def test_hostile_images_get_the_apps_own_message_without_a_server_path(tmp_path, name):
    """Gradio's preprocessing is out of the way (the path comes through undecoded); the app refuses with its words."""
    from gradio.data_classes import ImageData

    jpeg = tmp_path / "good.jpg"
    shape_image(size=64).save(jpeg)
    content = {
        "bomb.png": png_header_only(20_000, 20_000),
        "corrupt.jpg": CORRUPT_JPEG,
        "truncated.jpg": jpeg.read_bytes()[:300],  # a whole header, then the data stops
    }[name]
    path = tmp_path / name
    path.write_bytes(content)
    component = app.image_input()
    assert component.preprocess(ImageData(path=str(path), orig_name=name)) == str(path)  # nothing decoded
    with pytest.raises(ValueError, match="^This image cannot be used: ") as refused:
        chat.open_image(str(path), app.DEFAULT_MAX_IMAGE_PIXELS)
    assert str(tmp_path) not in str(refused.value)


def test_a_pasted_data_url_is_handed_over_as_bytes():
    from gradio.data_classes import ImageData

    url = "data:image/jpeg;base64," + base64.b64encode(CORRUPT_JPEG).decode()
    assert app.image_input().preprocess(ImageData(url=url)) == CORRUPT_JPEG


def test_messages_never_name_a_server_path():
    assert chat.without_paths("cannot identify image file '/tmp/gradio/ab12/cat.png'") == (
        "cannot identify image file 'cat.png'"
    )
    assert chat.without_paths(r"C:\Users\me\x.png is broken") == "x.png is broken"
    kept = "see https://huggingface.co/a/b, and/or 1 / 2"
    assert chat.without_paths(kept) == kept


def test_a_chat_longer_than_the_context_is_refused_before_generating(tiny, monkeypatch):
    model, processor = tiny
    context = model.config.get_text_config().max_position_embeddings
    monkeypatch.setattr(model, "generate", lambda *a, **kw: pytest.fail("generate ran on a prompt past the context"))
    long = [user("red square " * context, image=True)]
    with pytest.raises(chat.PromptTooLong, match=rf"too long for the model \([\d,]+ tokens, limit {context:,}\)"):
        chat.stream_answer(model, processor, long, shape_image(), do_sample=False, max_new_tokens=8)


def test_the_answer_is_capped_to_the_context_left(tiny):
    model, processor = tiny
    context = model.config.get_text_config().max_position_embeddings
    inputs, max_new_tokens = chat.encode(model, processor, [user("Hi", image=True)], shape_image(), 10**6)
    assert max_new_tokens == context - inputs["input_ids"].shape[1]
    assert chat.encode(model, processor, [user("Hi", image=True)], shape_image(), 5)[1] == 5


def test_a_hub_id_needs_trust_remote_code_before_anything_loads(monkeypatch):
    monkeypatch.setattr(app, "build_app", lambda *a, **kw: pytest.fail("the app loaded a Hub model without consent"))
    with pytest.raises(SystemExit, match="--trust_remote_code"):
        app.main(["--model", "someone/qwen-siglip"])
    args = app.parse_args(["--model", "someone/qwen-siglip", "--trust_remote_code", "--revision", "0123abc"])
    assert (args.trust_remote_code, args.revision) == (True, "0123abc")


def test_stream_answer_streams_the_greedy_answer(tiny):
    model, processor = tiny
    messages, image = [user("What colour is it?", image=True)], shape_image()
    states = list(chat.stream_answer(model, processor, messages, image, do_sample=False, max_new_tokens=12))
    assert len(set(states)) > 2, "the answer arrived in one piece: not streamed"
    assert all(b.startswith(a) for a, b in zip(states, states[1:]))  # each state extends the last
    assert states[-1] == greedy(model, processor, messages, image, 12)


def test_stream_answer_stops_when_the_consumer_goes_away(tiny):
    model, processor = tiny
    stream = chat.stream_answer(model, processor, [user("Hi", image=True)], shape_image(), max_new_tokens=10_000)
    next(stream)
    (generating,) = [t for t in threading.enumerate() if t.name == chat.GENERATE_THREAD]
    stream.close()  # what Gradio does on Stop or a closed tab: generation must end too, not run 10k tokens
    generating.join(timeout=30)
    assert not generating.is_alive()


# --- end to end, in headless Chromium --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(quickstart_run):
    """The embedded default's trained checkpoint, loaded apart from the app: the reference for its answers."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    folder = quickstart_run["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def app_url(quickstart_run):
    """The app on the trained default, served from this process on a free port, with the project's launch settings."""
    demo = app.build_app(str(quickstart_run["checkpoint"]), max_image_pixels=LIMIT)
    _, url, _ = app.launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install playwright (the browser tests use Debian's Chromium)")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium with `apt-get install -y chromium` (as root)")
    with sync_playwright() as p:
        # Playwright gives each launch a fresh temporary profile; its own browser download is never used.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# Records what every fetch brings back to the page (Gradio's events stream through fetch), chunk by chunk.
RECORD_RESPONSES = """
window.received = [];
const fetchOriginal = window.fetch;
window.fetch = async function (...args) {
  const response = await fetchOriginal.apply(this, args);
  if (!response.body) return response;
  const [mine, theirs] = response.body.tee();
  (async () => {
    const reader = mine.getReader(), decoder = new TextDecoder();
    for (let r = await reader.read(); !r.done; r = await reader.read())
      window.received.push({url: response.url, text: decoder.decode(r.value, {stream: true})});
  })();
  const copy = new Response(theirs, {status: response.status, statusText: response.statusText,
                                     headers: response.headers});
  Object.defineProperty(copy, "url", {value: response.url});
  return copy;
};
"""


def open_page(browser, url: str):
    """A fresh browser tab on the app (a new Gradio session), recording requests that leave this machine."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.external_requests = []
    page.on("request", lambda r: None if r.url.startswith(url) else page.external_requests.append(r.url))
    page.add_init_script(RECORD_RESPONSES)
    page.goto(url)
    return page


@pytest.fixture
def page(browser, app_url):
    page = open_page(browser, app_url)
    yield page
    page.close()


@pytest.fixture(scope="module")
def tiny_app_url(tiny_checkpoint):
    """The app on the tiny random checkpoint: for what needs no trained model (refusals, errors)."""
    demo = app.build_app(str(tiny_checkpoint), max_image_pixels=LIMIT)
    _, url, _ = app.launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture
def tiny_page(browser, tiny_app_url):
    page = open_page(browser, tiny_app_url)
    yield page
    page.close()


def upload(page, tmp_path: Path, image, name: str) -> None:
    path = tmp_path / name
    image.save(path)
    page.locator("#image input[type=file]").set_input_files(path)


def ask(page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#question textarea").press("Enter")


def shown(answer: str) -> str:
    """How Gradio labels an answer in the chat: its Chatbot trims surrounding blank space (`inspect.cleandoc`)."""
    return f"bot's message: {inspect.cleandoc(answer)}"


def set_slider(page, label: str, value: float) -> None:
    box = page.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Enter")


class SlowStreamer(chat.TextIteratorStreamer):
    """The app's streamer, 50 ms a piece: the tiny model writes a whole answer faster than a browser repaints.

    Each answer's last piece also waits for `finish` to be set, so a test can act while an answer is unfinished.
    """

    finish = threading.Event()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        time.sleep(0.05)
        if stream_end:
            SlowStreamer.finish.wait(timeout=TIMEOUT_MS / 1000)
        super().on_finalized_text(text, stream_end)


@pytest.mark.browser
def test_chat_in_the_browser_streams_greedy_answers_in_english_and_chinese(page, trained, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    monkeypatch.setattr(chat, "TextIteratorStreamer", SlowStreamer)
    SlowStreamer.finish.clear()
    model, processor = trained
    image = shape_image("red", size=192, box=(12, 12, 84, 84))  # like the training images: a shape in one cell
    upload(page, tmp_path, image, "red.png")
    page.get_by_text("Sampling settings").click()
    set_slider(page, "Temperature (0 = greedy)", 0)  # greedy, so the page must show exactly the reference
    set_slider(page, "Max new tokens", 24)
    bot = page.get_by_test_id("bot")  # Gradio labels each answer "bot's message: <the text as streamed>"

    # Record every state of the latest answer as the page updates it, to see the answer arrive in pieces.
    page.evaluate(
        """() => { window.seen = new Set();
        new MutationObserver(() => { const b = [...document.querySelectorAll('[data-testid="bot"]')].pop();
          if (b) window.seen.add(b.getAttribute('aria-label')); })
        .observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
        window.statuses = new Set();
        new MutationObserver(() => window.statuses.add(document.querySelector('#status').innerText.trim()))
        .observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true}); }"""
    )
    first = "Describe the image."  # a caption: several tokens, so streaming shows
    expected = greedy(model, processor, [user(first, image=True)], image, 24)
    ask(page, first)
    expect(bot).to_have_count(1)
    expect(page.locator("#status")).to_have_text(app.ANSWERING)  # held unfinished by SlowStreamer.finish
    expect(page.locator("#question textarea")).to_have_value("")

    # A follow-up in Chinese, typed and sent while the first answer is still being written: it is asked once that
    # answer is complete, about the same image, with the first turn as context.
    follow_up = "这是什么形状？"
    ask(page, follow_up)
    page.wait_for_timeout(300)  # the unfinished answer keeps streaming: it must not wipe the typed question
    SlowStreamer.finish.set()
    expect(bot.first).to_have_attribute("aria-label", shown(expected))
    seen = page.evaluate("[...window.seen]")
    assert len(seen) > 2, f"the answer appeared in one piece, not streamed: {seen}"
    # The model's context is the chat as shown, so the first answer comes back in its shown (trimmed) form.
    history = [user(first, image=True), {"role": "assistant", "content": inspect.cleandoc(expected)}, user(follow_up)]
    expected_2 = greedy(model, processor, history, image, 24)
    expect(bot).to_have_count(2)
    expect(bot.nth(1)).to_have_attribute("aria-label", shown(expected_2))
    expect(page.get_by_test_id("user").nth(1)).to_have_text(follow_up)
    expect(page.locator("#status")).to_have_text("")
    if shot := os.environ.get("QWEN_SIGLIP_SCREENSHOT"):
        page.screenshot(path=ROOT / shot, full_page=True)

    # Clearing the chat forgets the turns but keeps the image: the first question gets the first answer again.
    page.locator("#chatbot").get_by_role("button", name="Clear").click()
    expect(bot).to_have_count(0)
    ask(page, first)
    expect(bot).to_have_count(1)
    expect(bot.first).to_have_attribute("aria-label", shown(expected))
    expect(page.locator("#status")).to_have_text("")

    blue = shape_image("blue", size=192, box=(108, 108, 180, 180))
    upload(page, tmp_path, blue, "blue.png")  # a new image starts a new conversation, about the new image
    expect(bot).to_have_count(0)
    expected_blue = greedy(model, processor, [user(first, image=True)], blue, 24)
    assert expected_blue != expected, "the two images get the same answer: this check would be vacuous"
    ask(page, first)
    expect(bot.first).to_have_attribute("aria-label", shown(expected_blue))
    assert page.external_requests == [], "the page reached beyond the app: it would not work offline"


@pytest.mark.browser
def test_missing_and_oversized_images_show_a_message_on_the_page(tiny_page, tmp_path):
    from playwright.sync_api import expect

    page = tiny_page
    ask(page, "What is it?")
    expect(page.locator("#status")).to_contain_text("Upload or paste an image first")
    upload(page, tmp_path, shape_image(size=300), "big.png")
    expect(page.locator("#status")).to_contain_text("This image cannot be used")  # at once, before any question
    expect(page.locator("#status")).to_contain_text("65,536")
    page.locator("#send").click()
    page.wait_for_timeout(500)
    expect(page.locator("#status")).to_contain_text("This image cannot be used")  # and when asked: no answer
    expect(page.get_by_test_id("bot")).to_have_count(0)
    expect(page.locator("#question textarea")).to_have_value("What is it?")  # kept, to ask again


@pytest.mark.browser
def test_hostile_uploads_and_long_chats_get_the_apps_own_message_and_no_server_path(
    tiny_page, tiny_checkpoint, tmp_path
):
    """A 400-megapixel PNG header and a corrupt JPEG: Gradio used to fail on them with its raw "Could not
    preprocess input component" error and the server's temporary path. Then a question past the model's context."""
    from gradio.utils import get_upload_folder
    from playwright.sync_api import expect

    page = tiny_page
    status = page.locator("#status")
    for name, content in (("bomb.png", png_header_only(20_000, 20_000)), ("corrupt.jpg", CORRUPT_JPEG)):
        upload(page, tmp_path, shape_image(size=48), "fine.png")
        expect(status).to_have_text("")  # a fine image: no message, so the next one is new
        (tmp_path / name).write_bytes(content)
        page.locator("#image input[type=file]").set_input_files(tmp_path / name)
        expect(status).to_contain_text("This image cannot be used")
        ask(page, "What is it?")
        page.wait_for_timeout(500)
        expect(status).to_contain_text("This image cannot be used")
        expect(page.get_by_test_id("bot")).to_have_count(0)

    upload(page, tmp_path, shape_image(size=48), "fine.png")
    expect(status).to_have_text("")  # the upload's own check is done: it cannot overwrite the answer's status
    ask(page, "red square " * 1024)  # over the tiny model's 1024-token context
    expect(status).to_contain_text("This conversation is too long for the model")
    expect(page.get_by_test_id("bot")).to_have_count(0)

    text = page.inner_text("body")
    assert "preprocess" not in text and "Traceback" not in text
    server_paths = [str(ROOT), str(tiny_checkpoint), get_upload_folder(), str(tmp_path)]
    received = page.evaluate("window.received")
    assert any("too long for the model" in r["text"] for r in received), "the recording missed the event stream"
    # Gradio's upload answers with the file's handle on the server (a path in its upload folder), by design:
    # the page hands it back with each question. Everything else the server sends must name no path.
    messages = [r for r in received if "/upload" not in r["url"]]
    leaks = [(r["url"], r["text"][:200]) for r in messages if any(p in r["text"] for p in server_paths)]
    assert not leaks, f"server paths sent to the browser: {leaks}"
    assert not any(p in text for p in server_paths)
    assert page.external_requests == []
