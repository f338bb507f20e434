"""Shared fixtures: tiny bases saved like Hub checkpoints, the tiny model built from them, and a saved checkpoint.

Everything is built offline in temporary folders; nothing here is downloaded.
"""

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread for torch here and in every process a test starts: the embedded default trains on the other core
# meanwhile (quickstart_in_background), and two multi-threaded jobs on two cores slow each other far more than twice.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from qwen_siglip.compose import compose  # noqa: E402
from qwen_siglip.tiny import save_tiny_bases  # noqa: E402

# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A port nobody listens on now: a fixed one fails the test whenever something else holds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """A server we started, stopped: politely, then for good."""
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved checkpoint's tensors."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def changed(before: dict, after: dict, prefix: str) -> bool:
    """Whether any tensor whose name starts with `prefix` differs (there must be one)."""
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def torchrun(nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node N` on a free port, from this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port())]  # fmt: skip


# ----------------------------------------------------------------------------- deprecations we cause

# How many library frames may separate our call from the `warnings.warn` it triggers. A deprecated argument we pass
# warns one or two frames in (transformers' deprecate_kwarg, a config's __post_init__ under TRL's); a library's own
# use of something deprecated, deep inside Trainer.train(), is further away and not ours to fix.
OUR_CALL_DEPTH = 3
# Frames that only forward a call (nn.Module.__call__, decorators, dataclass __init__) do not count.
PLUMBING = ("torch/nn/modules/module.py", "transformers/utils/generic.py", "transformers/utils/output_capturing.py",
            "transformers/utils/deprecation.py", "functools.py", "contextlib.py", "<string>")  # fmt: skip


def _our_call_site(frame) -> str | None:
    """'file:line' of the repo code that caused a warning issued in `frame`, if it is at most OUR_CALL_DEPTH away."""
    library_frames = 0
    while frame is not None and library_frames <= OUR_CALL_DEPTH:
        path = frame.f_code.co_filename
        if path.startswith(str(ROOT)) and "site-packages" not in path:
            return f"{Path(path).relative_to(ROOT)}:{frame.f_lineno}"
        if not path.replace("\\", "/").endswith(PLUMBING):
            library_frames += 1
        frame = frame.f_back
    return None


@pytest.fixture(autouse=True)
def no_deprecated_calls_from_our_code(monkeypatch):
    """Fail a test in which our code triggers a DeprecationWarning or FutureWarning, wherever it is raised.

    pytest's `error::FutureWarning:module` filters match the module that *calls* warnings.warn: transformers' own
    files, for a deprecated argument we pass (the `past_key_values=` we gave Qwen2Model printed one per training
    step). So we look up the stack instead, from the moment `warnings.warn` is called.
    """
    real_warn, offences = warnings.warn, []

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        category = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(category, (DeprecationWarning, FutureWarning)):
            if site := _our_call_site(sys._getframe(1)):
                offences.append(f"{category.__name__} caused by {site}: {message}")
        real_warn(message, category, stacklevel + 1, source, **kwargs)  # +1: keep the warning's own location

    monkeypatch.setattr(warnings, "warn", warn)
    yield
    assert not offences, "our code uses deprecated API:\n" + "\n".join(dict.fromkeys(offences))


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory) -> tuple[Path, Path]:
    """(vision_dir, text_dir): a tiny SigLIP (32 px, 8 px patches: 16 patches) and a tiny Qwen2, saved."""
    return save_tiny_bases(tmp_path_factory.mktemp("bases"))


def build_tiny(bases: tuple[Path, Path], spread: bool = True, **config_kwargs):
    """Compose a tiny model + processor from saved bases, through the real builder."""
    vision_dir, text_dir = bases
    vision, text = str(vision_dir), str(text_dir)
    model, processor = compose(vision, text, **config_kwargs)
    if spread:
        # A freshly initialised LM (std 0.02) greedily repeats one token, which would make generation tests pass
        # vacuously. Wider weights give varied, image-dependent continuations.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.3)
    return model.eval(), processor


@pytest.fixture(scope="session")
def tiny(tiny_bases):
    """A tiny model (eval mode) and its processor. Tests must not modify them."""
    torch.manual_seed(0)
    return build_tiny(tiny_bases)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny, tmp_path_factory) -> Path:
    """The tiny model and processor saved with save_pretrained, as a Hub repo would hold them."""
    model, processor = tiny
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def shape_image(color: str = "red", size: int = 48, box: tuple = (8, 8, 30, 30)) -> Image.Image:
    """A coloured square on white: distinct images give distinct pixel_values."""
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).rectangle(box, fill=color)
    return img


def chat(*turns: str, system: str | None = None, images: int = 1) -> dict:
    """An example in TRL's conversational format: user/assistant texts alternate, images go in the first turn."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        content = [{"type": "image"}] * (images if i == 0 else 0) + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return {"messages": messages, "images": [shape_image(c) for c in ["red", "blue", "green"][:images]]}


def user_turn(text: str, n_images: int = 1) -> list[dict]:
    """A one-turn chat: `n_images` image items then the question."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------- training

# Settings every tiny training run in the tests shares: CPU, fp32, no checkpoints unless a test asks, few steps.
CPU_RUN = [
    "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--activation_checkpointing", "false",
    "--per_device_train_batch_size", "4", "--global_batch_size", "4", "--max_length", "256",
    "--logging_steps", "1", "--save_strategy", "no", "--dataloader_num_workers", "0", "--seed", "0",
]  # fmt: skip


RUNNER = str(ROOT / "tests" / "stage_runner.py")  # a training stage as its script runs it, plus test-only switches


def run_stage(args: list[str], env: dict, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`tests/stage_runner.py STAGE ARGS` in its own process (or under `launcher`, e.g. torchrun), one thread each:
    a training stage exactly as its script runs it, with the test-only switches of `env`."""
    cmd = (launcher or [sys.executable]) + [RUNNER, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic shapes set at the tiny tower's 32 px: captions (LLaVA json), Q&A (minimind-v jsonl) and 8
    questions in each held-out split (`sft_test`: unseen-layout; `sft_test_seen`, `sft_test_unseen-pair`)."""
    from qwen_siglip import synthetic

    out = tmp_path_factory.mktemp("shapes")
    return synthetic.make_shapes_dataset(out, n_pretrain=32, n_sft=32, n_test=8, image_size=32)


QUICKSTART_TIMEOUT_S = 3600


def uses_quickstart(item: pytest.Item) -> bool:
    return "quickstart_run" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read the embedded default's run go last: the run trains in the background meanwhile."""
    items.sort(key=uses_quickstart)  # stable: the order within each part stays


@pytest.fixture(scope="session", autouse=True)
def quickstart_in_background(request, tmp_path_factory):
    """`python quickstart.py` in its own process from the suite's start, when a selected test needs it: the longest
    single piece of the suite, it overlaps the rest. On one thread: the two cores then hold it and the rest, one each
    (the README gives this run's numbers beside `make quickstart`'s two-thread ones).

    Yields (process, out folder, log) or None; the process is killed if the session ends first."""
    if os.environ.get("QWEN_SIGLIP_QUICKSTART") or not any(map(uses_quickstart, request.session.items)):
        yield None
        return
    out = tmp_path_factory.mktemp("quickstart")
    log = out.parent / "quickstart.log"
    cmd = [sys.executable, str(ROOT / "quickstart.py"), "--out", str(out), "--threads", "1"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    yield proc, out, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def quickstart_run(quickstart_in_background) -> dict:
    """The embedded default as `make quickstart` runs it, on one thread: `quickstart.py` (both stages through the real
    scripts, then held-out evaluation), so the README's claims are what CI checks.

    Returns quickstart's summary (`splits`: {split: {task: scores}}, `seconds`) plus `checkpoint`, the trained stage-2
    folder (tests may read, never modify it), whose `eval/<split>/<task>/` holds each evaluation's files and page.
    While iterating on the tests that use it, QWEN_SIGLIP_QUICKSTART=<a finished `quickstart.py --out` folder> reuses
    that run instead of training again (CI never sets it).
    """
    import json

    if reuse := os.environ.get("QWEN_SIGLIP_QUICKSTART"):
        return {**json.loads((Path(reuse) / "summary.json").read_text()), "checkpoint": Path(reuse) / "sft"}
    proc, out, log = quickstart_in_background
    try:
        proc.wait(timeout=QUICKSTART_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        pytest.fail(f"quickstart.py failed (exit {proc.returncode}); the end of its output:\n{tail}")
    return {**json.loads((out / "summary.json").read_text()), "checkpoint": out / "sft"}


# ----------------------------------------------------------------------------- the real Qwen tokenizer

# Qwen's own BPE (see its README): a tokenizer trained in code hides real merges, e.g. "\n\n" as one token.
QWEN_TOKENIZER = ROOT.parent / "shared" / "qwen-tokenizer"


@pytest.fixture(scope="session")
def qwen_bases(tiny_bases, tmp_path_factory) -> tuple[Path, Path]:
    """(vision_dir, text_dir): the tiny SigLIP and a random tiny Qwen2 with Qwen2.5's vocabulary and tokenizer."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if not (QWEN_TOKENIZER / "tokenizer.json").is_file():
        why = f"the real Qwen tokenizer is missing: expected tokenizer.json in {QWEN_TOKENIZER}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)  # CI always has it: a silent skip there would hide every real-BPE test
        pytest.skip(why)
    text_dir = tmp_path_factory.mktemp("qwen_bases") / "qwen2"
    text_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # its chat_template is Qwen3's: ours replaces it
        shutil.copy(QWEN_TOKENIZER / name, text_dir / name)
    tok = AutoTokenizer.from_pretrained(text_dir)
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=151936,  # Qwen2.5-0.5B's embedding rows, more than the tokenizer's 151,669 entries
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    Qwen2ForCausalLM(config).save_pretrained(text_dir)
    GenerationConfig(
        eos_token_id=[config.eos_token_id, config.pad_token_id], pad_token_id=config.pad_token_id
    ).save_pretrained(text_dir)
    return tiny_bases[0], text_dir


@pytest.fixture(scope="session")
def qwen_tiny(qwen_bases):
    """A tiny model with Qwen2.5's vocabulary and real tokenizer (eval mode), and its processor. Do not modify."""
    return build_tiny(qwen_bases, spread=False)


@pytest.fixture(params=["tiny", "qwen"])
def each_processor(request):
    """The processor of `tiny` (a BPE trained in code) and of `qwen_tiny` (Qwen's real BPE): run a test with both."""
    return request.getfixturevalue("tiny" if request.param == "tiny" else "qwen_tiny")[1]
