"""A QwenSiglip checkpoint as GGUF files for llama.cpp (llama-server, llama-mtmd-cli, llama-cpp-python, Ollama).

The command is `export_gguf.py`; the halves are `gguf_text` (the LM, read as llama.cpp's `qwen2`) and `gguf_vision`
(the tower and projector, an mmproj for llama.cpp's `mtmd`).

Notable:
- One run writes one mmproj (fp16) and one LM file per `--outtype`: `f16` is written here with gguf-py; `q8_0` and
  `q4_k_m` are llama.cpp's own quantiser, reached through llama-cpp-python (`llama_model_quantize`), from a
  full-precision (fp32) LM file written first and deleted after.
- Everything llama.cpp cannot compute as we do is refused before any weight is loaded (pixel shuffle, RoPE
  scaling, another tokenizer, ...), with the reason and what to export instead.
- File names follow the community's: `<name>-F16.gguf`, `<name>-Q8_0.gguf`, `mmproj-<name>-F16.gguf`. A README.md
  beside them names the files and how to run them; `push` uploads the folder through `hub.push_folder`.
- Known runtime differences, said where users read (README and the card): llama.cpp letterboxes a non-square
  image (grey padding) where our processor stretches it; llama-cpp-python's own sampler ignores the GGUF's
  suppressed tokens (pass `logit_bias`).
"""

import functools
import tempfile
from pathlib import Path

import torch

from configuration_qwen_siglip import QwenSiglipConfig
from modeling_qwen_siglip import QwenSiglipForConditionalGeneration
from processing_qwen_siglip import QwenSiglipProcessor
from qwen_siglip.gguf_text import (
    ARCH,
    add_lm_hparams,
    add_tokenizer,
    as_gguf_array,
    check_pre_tokenizer,
    check_text_config,
    gguf_chat_template,
    lm_tensors,
)
from qwen_siglip.gguf_vision import check_vision, write_mmproj
from qwen_siglip.hub import display_name, hub_ids, push_folder

# --outtype -> (file tag, llama.cpp's LLAMA_FTYPE for its quantiser; None: written here)
OUTTYPES = {"f32": ("F32", None), "f16": ("F16", None), "q8_0": ("Q8_0", 7), "q4_k_m": ("Q4_K_M", 15)}


def check_exportable(config: QwenSiglipConfig, processor: QwenSiglipProcessor) -> None:
    """ValueError, saying why and what to do, for a checkpoint llama.cpp would not run as transformers does."""
    import json

    check_text_config(config.text_config)
    check_vision(config, processor.image_processor)
    check_pre_tokenizer(json.loads(processor.tokenizer.backend_tokenizer.to_str()))
    gguf_chat_template(processor.chat_template)


def file_names(name: str, outtypes: list[str]) -> dict[str, str]:
    """{"mmproj": ..., outtype: ...}: the files one export writes."""
    return {"mmproj": f"mmproj-{name}-F16.gguf", **{t: f"{name}-{OUTTYPES[t][0]}.gguf" for t in outtypes}}


def write_language_model(model, processor, path: Path, name: str, half: bool) -> None:
    """The LM GGUF at `path`: matrices fp16 (`half`) or fp32, vectors fp32, tokenizer and chat template included."""
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    add_lm_hparams(writer, model.config.text_config, model.config.context_length)
    add_tokenizer(writer, model, processor.tokenizer, processor.chat_template)
    for tensor_name, tensor in lm_tensors(model).items():
        writer.add_tensor(tensor_name, as_gguf_array(tensor, half=half))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: Path, dst: Path, outtype: str, threads: int = 0) -> None:
    """llama.cpp's quantiser (through llama-cpp-python) from the fp32 LM file `src` to `dst`."""
    import ctypes

    import llama_cpp
    import llama_cpp._logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = OUTTYPES[outtype][1]
    params.nthread = threads
    # llama.cpp logs a line per tensor: only its warnings (e.g. tensors quantised to a fallback type) are shown.
    llama_cpp.llama_log_set(warnings_only_log(), ctypes.c_void_p(0))
    try:
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own
    if failed:
        raise RuntimeError(f"llama.cpp's quantiser failed to write {dst.name} ({outtype})")


@functools.cache
def warnings_only_log():
    """A llama.cpp log callback printing warnings and errors only; cached: a ctypes callback must outlive its use."""
    import sys

    import llama_cpp

    def log(level: int, text: bytes, user_data) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h)
            print(text.decode(errors="replace"), end="", file=sys.stderr, flush=True)

    return llama_cpp.llama_log_callback(log)


def load(src: str | Path) -> tuple[QwenSiglipForConditionalGeneration, QwenSiglipProcessor]:
    """(model in fp32, eval mode; processor) of a checkpoint folder, after `check_exportable` passed on its config."""
    config = QwenSiglipConfig.from_pretrained(src)
    # Given the config, AutoTokenizer need not read config.json, whose auto_map would ask to trust remote code.
    processor = QwenSiglipProcessor.from_pretrained(src, config=config)
    check_exportable(config, processor)  # before the weights: a refused checkpoint costs no loading
    model = QwenSiglipForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    return model, processor


def export(src: str | Path, dst: str | Path, outtypes: list[str] = ("f16",), name: str | None = None) -> dict:
    """Write the GGUF files of checkpoint folder `src` into `dst` (new or empty); returns {"mmproj"/outtype: Path}."""
    src, dst = Path(src), Path(dst)
    check_outtypes(outtypes)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; export into a new or empty folder")
    model, processor = load(src)
    name = name or src.resolve().name or "qwen-siglip"
    files = write_gguf(model, processor, dst, outtypes, name)
    (dst / "README.md").write_text(gguf_card(name, files, str(src), model.config.image_token_id))
    sizes = ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in files.values())
    print(f"Exported {display_name(str(src))} -> {dst.name}/: {sizes}")
    return files


def check_outtypes(outtypes) -> None:
    unknown = [t for t in outtypes if t not in OUTTYPES]
    if unknown or not outtypes:
        raise ValueError(f"--outtype must be one or more of {sorted(OUTTYPES)}, got {list(outtypes)}")


def write_gguf(model, processor, dst: Path, outtypes: list[str], name: str) -> dict[str, Path]:
    """The mmproj and one LM file per outtype, from a model in memory, into `dst`; returns {"mmproj"/outtype: Path}."""
    check_outtypes(outtypes)
    check_exportable(model.config, processor)
    files = {k: dst / v for k, v in file_names(name, list(outtypes)).items()}
    dst.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        write_mmproj(model, processor.image_processor, files["mmproj"], name)
        for outtype in [t for t in outtypes if OUTTYPES[t][1] is None]:
            write_language_model(model, processor, files[outtype], name, half=outtype == "f16")
        if quantized := [t for t in outtypes if OUTTYPES[t][1] is not None]:
            with tempfile.TemporaryDirectory(dir=dst) as tmp:  # the same disk: no copy across file systems
                full = Path(tmp) / "full-precision.gguf"
                write_language_model(model, processor, full, name, half=False)
                for outtype in quantized:
                    quantize(full, files[outtype], outtype)
    return files


def gguf_card(name: str, files: dict[str, Path], src: str, image_token_id: int) -> str:
    """README.md for the GGUF folder (or repo): the files and how to run them."""
    lm = [p.name for k, p in files.items() if k != "mmproj"]
    bias = f"logit_bias={{{image_token_id}: -100}}"  # <|image_pad|>: the GGUF suppresses it, llama-cpp-python does not
    mmproj = files["mmproj"].name
    header = ["---", "library_name: gguf", "pipeline_tag: image-text-to-text", "tags:", "- gguf", "- llama.cpp",
              "- qwen-siglip", "- vision-language"]  # fmt: skip
    if base := hub_ids(src):
        header += ["base_model:", f"- {base[0]}", "base_model_relation: quantized"]
    lines = header + ["---", "", f"# {name} (GGUF)", ""]
    lines += [f"GGUF files of the QwenSiglip checkpoint `{display_name(src)}` for llama.cpp:", ""]
    lines += [f"- `{p.name}`: the language model ({k}; llama.cpp architecture `qwen2`), chat template included"
              for k, p in files.items() if k != "mmproj"]  # fmt: skip
    lines += [f"- `{mmproj}`: the SigLIP vision tower and the projector (`--mmproj`)", ""]
    lines += [
        "```bash",
        f"llama-mtmd-cli -m {lm[0]} --mmproj {mmproj} --image shape.png -p 'What colour is the shape?' --temp 0",
        f"llama-server -m {lm[0]} --mmproj {mmproj} --port 8080   # OpenAI-compatible /v1/chat/completions",
        "```",
        "",
        "From Python (`pip install llama-cpp-python`):",
        "",
        "```python",
        "from llama_cpp import Llama",
        "from llama_cpp.llama_chat_format import MTMDChatHandler",
        "",
        f'llm = Llama("{lm[0]}", chat_handler=MTMDChatHandler("{mmproj}"), n_ctx=2048)',
        'image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}',
        'messages = [{"role": "user", "content": [image, {"type": "text", "text": "What colour is the shape?"}]}]',
        f'print(llm.create_chat_completion(messages, temperature=0, {bias})["choices"][0]["message"]["content"])',
        "```",
        "",
        "The chat template is the model's own (ChatML, no default system prompt) and wraps each image in "
        "`<|vision_start|>` ... `<|vision_end|>`. llama.cpp letterboxes a non-square image (grey bars) where the "
        "transformers processor stretches it to a square: resize images to a square first for the same answers. "
        "The GGUF suppresses `<|image_pad|>` (`tokenizer.ggml.suppress_tokens`), which llama-server and "
        f"llama-mtmd-cli apply; llama-cpp-python's sampler does not read it, hence `{bias}` above.",
        "",
    ]
    return "\n".join(lines)


def push(dst: Path, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Upload the GGUF folder (files and README.md) to `repo_id`, e.g. `user/model-GGUF`; returns the URL."""
    return push_folder(dst, repo_id, private=private, token=token)
