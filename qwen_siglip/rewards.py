"""GRPO's reward functions, in TRL's signature: `f(completions, solution, **kwargs)` -> one float (or None) each.

    exact_match     1 if the answer equals the reference after evaluate_vlm.py's normalisation (metrics.py)
    length_format   1 for a one-line answer as long as the reference, falling to 0 at twice its length or empty
    module:function your own: a TRL reward function, or a scorer `f(prediction, reference)` as evaluate_vlm.py's
                    `--scorer` takes (a bool, a number or None, per example)

Notable:
- `solution` is the reference answer, the column preferences.PromptDataset fills from the last assistant turn (and
  the name TRL's own reward functions read), so these work with TRL's stock `trl grpo --reward_funcs` too.
- A completion arrives as TRL gives it for conversational prompts, `[{"role": "assistant", "content": text}]`, or as
  plain text; `text_of` reads both.
- None means "not applicable": TRL turns it into NaN and leaves it out of the mean, as evaluation leaves a scorer's
  None out of its mean.
"""

import inspect
from collections.abc import Callable

from qwen_siglip.evaluation import load_scorer
from qwen_siglip.metrics import normalize_answer, tokens

Reward = Callable[..., list[float | None]]


def text_of(completion) -> str:
    """A completion's text: plain text, or the content of TRL's one assistant message (text or typed items)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    return content if isinstance(content, str) else "".join(c.get("text") or "" for c in content)


def exact_match(completions: list, solution: list[str], **kwargs) -> list[float]:
    """1.0 where the answer equals the reference once both are normalised ('The Red.' == 'red'), else 0.0."""
    return [float(normalize_answer(text_of(c)) == normalize_answer(s)) for c, s in zip(completions, solution)]


def length_format(completions: list, solution: list[str], **kwargs) -> list[float]:
    """A one-line answer of the reference's length (words, or characters for Chinese) scores 1.0, falling linearly
    to 0.0 at none or twice as many; an empty or multi-line answer scores 0.0. It teaches the model to answer in
    the reference's form, not what the answer is."""
    rewards = []
    for completion, reference in zip(completions, solution):
        text = text_of(completion).strip()
        n, m = len(tokens(text)), max(1, len(tokens(reference)))
        rewards.append(0.0 if not text or "\n" in text else max(0.0, 1.0 - abs(n - m) / m))
    return rewards


BUILT_IN: dict[str, Reward] = {"exact_match": exact_match, "length_format": length_format}


def from_scorer(name: str, scorer: Callable[[str, str], float | bool | None]) -> Reward:
    """A per-example scorer `f(prediction, reference)` as a TRL reward function named `name`."""

    def reward(completions: list, solution: list[str], **kwargs) -> list[float | None]:
        scores = [scorer(text_of(c), s) for c, s in zip(completions, solution)]
        return [None if score is None else float(score) for score in scores]

    reward.__name__ = name  # TRL logs each reward under its function's name
    return reward


def load_reward(spec: str) -> Reward:
    """'exact_match', 'length_format', or 'module:function': a TRL reward (it takes `completions`) or a scorer."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if ":" not in spec:
        raise ValueError(f"--reward_funcs {spec!r}: expected one of {sorted(BUILT_IN)} or module:function")
    name, function = load_scorer(spec)
    return function if "completions" in inspect.signature(function).parameters else from_scorer(name, function)
