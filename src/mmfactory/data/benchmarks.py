"""The records a benchmark is made of (questions, probes, images and what scores them), built by a data
source (the world's adapter, or a reader of benchmark files) and consumed by :mod:`mmfactory.eval`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

CHOICE_LETTERS = "ABCD"
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's MMBench


def format_choice(item: dict, shift: int = 0) -> tuple[str, str]:
    """``(prompt, right letter)`` for a multiple-choice ``{"question", "options", "answer"}`` (``answer``:
    the right option's index) with the options rotated by ``shift`` (MMBench's CircularEval asks every
    rotation and counts a question right only if every one is answered right)."""
    n = len(item["options"])
    if not 2 <= n <= len(CHOICE_LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(CHOICE_LETTERS)} options, got {n}")
    options = [item["options"][(k + shift) % n] for k in range(n)]
    lines = [f"{CHOICE_LETTERS[k]}. {option}" for k, option in enumerate(options)]
    prompt = "\n".join([item["question"], *lines, CHOICE_PROMPT])
    return prompt, CHOICE_LETTERS[(item["answer"] - shift) % n]


@dataclass
class Benchmarks:
    """VQA samples, POPE probes per split, caption samples with the prompt that asks for a caption and
    the object vocabulary (``mentions``) that scores object hallucination (None: not scored)."""

    vqa: list[dict] = field(default_factory=list)
    pope: dict[str, list[dict]] = field(default_factory=dict)
    captions: list[dict] = field(default_factory=list)
    mme: list[dict] = field(default_factory=list)  # MME-style yes/no pairs
    mmbench: list[dict] = field(default_factory=list)  # MMBench-style multiple choice
    caption_prompt: str = "Describe the image briefly."
    mentions: Callable[[str], list[str]] | None = None


@dataclass
class ZeroShotBenchmark:
    """``images`` (uint8 ``[H, W, 3]``) with ``labels`` (indices into ``classes``) and the prompts of every
    class (``prompts[c]``: the texts whose mean embedding is class ``c``). ``name`` keys the metrics."""

    name: str
    images: list[np.ndarray]
    labels: list[int]
    classes: list[str]
    prompts: list[list[str]]


@dataclass
class AVBenchmark:
    """``name``: the metric prefix; ``streams``: the streams each item is asked with (a subset of
    ``video``, ``audio``); ``prompt``: set for captioning (items hold ``references``)."""

    name: str
    items: list[dict]
    streams: tuple[str, ...]
    prompt: str | None = None
