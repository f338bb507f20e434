"""Loading a checkpoint for inference, as the app and evaluation do: the remote-code policy, revision, context.

Notable:
- Code from the Hub is not run unasked: a local folder loads with its own code (it is the user's); a Hub id needs
  `trust_remote_code` (and `revision` pins the commit whose code was read). Checked before any download.
- `context_length` is the LM's context with rope scaling included (`QwenSiglipConfig.context_length`), so a prompt
  guard here agrees with the model's own.
- `prompt_length` counts a templated prompt's tokens with each image placeholder expanded, cheaply past a limit: a
  1 MB question is not tokenized whole.
"""

from pathlib import Path

from qwen_siglip.hub import HUB_ID


def remote_code_allowed(model: str, trust_remote_code: bool = False) -> bool:
    """Whether loading `model` may run the Python files it holds; ValueError for a Hub id without permission.

    A local folder is the user's own checkpoint: its code runs as before. A Hub id would download a repository's
    code and run it on this machine, so it needs an explicit yes. Checked before anything is downloaded.
    """
    if Path(model).is_dir():
        return True
    if not HUB_ID.match(model):
        raise ValueError(f"--model {model!r} is neither a local folder nor a Hub id (owner/name)")
    if not trust_remote_code:
        raise ValueError(
            f"--model {model} is not a local folder, so it names a Hub repository. Loading it runs the Python code "
            "that repository holds (modeling_*.py, processing_*.py) on this machine. Read that code on the Hub, then "
            "pass --trust_remote_code, with --revision <commit> to pin the version you read. (If you meant a local "
            "folder: there is no such folder here.)"
        )
    return True


def load_model(model_id: str, *, trust_remote_code: bool = False, revision: str | None = None, dtype=None):
    """(model in eval mode, processor), after `remote_code_allowed`; `revision` pins a Hub commit."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    trust = remote_code_allowed(model_id, trust_remote_code)
    kwargs = dict(trust_remote_code=trust, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(model_id, **kwargs)


def context_length(model) -> int:
    """The LM's context in tokens, prompt and answer together, rope scaling included."""
    config = model.config
    return getattr(config, "context_length", None) or config.get_text_config().max_position_embeddings


def prompt_length(processor, text: str, limit: int) -> int:
    """Tokens of a templated prompt once its image placeholders are expanded; exact up to `limit`, and cheap past it.

    A 1 MB question takes over a second to tokenize whole. Its first 8 * `limit` characters already hold more than
    `limit` tokens for any real text (tokens average 2-5 characters), so only that head is tokenized; then the
    number returned is the head's count, over the limit. Only a text with unusually long tokens is tokenized whole.
    """
    tokenizer = processor.tokenizer
    head = text[: 8 * limit]
    n = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    if n <= limit and len(head) < len(text):
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # each image placeholder is one token in text and `num_image_tokens` tokens in the model's input
    image_token = getattr(processor, "image_token", None)
    n_images = text.count(image_token) if image_token else 0
    return n + n_images * (getattr(processor, "num_image_tokens", 1) - 1)
