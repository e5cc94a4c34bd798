"""On-policy preference pairs for LLaVA-MoD's preference distillation (RLAIF-V style): the student, as the
stage starts, samples replies to single-turn image prompts; each is judged against the prompt's ground
truth (:func:`judge_reply`) and the worst and best become a pair.

The stage's prepare step samples once, on the main process, into the artifact ``on_policy_pairs/``
(:mod:`mmfactory.artifacts`): ``pairs.jsonl`` (one ``{"prompt_index", "prompt", "chosen", "rejected"}`` per
line; the image is the prompt's, read again from the prompt sources) and ``counts.json`` (replies sampled,
prompts skipped). Its fingerprint (:func:`pairs_fingerprint`) names the student, the sampling settings, the
prompts and the tokenizer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfactory.config import ConfigError
from mmfactory.data.multimodal import MultimodalProcessor
from mmfactory.data.teacher_logits import fingerprint
from mmfactory.eval.metrics import normalize_answer
from mmfactory.eval.mllm import generate_multimodal_replies
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.mllm import MultimodalLM

PAIRS_FILE = "pairs.jsonl"
COUNTS_FILE = "counts.json"
Mentions = Callable[[str], list[str]]


@dataclass
class OnPolicySampling:
    """On-policy pairs (RLAIF-V style): the student as the stage starts samples ``samples_per_prompt``
    replies at ``temperature`` to each single-turn prompt of ``data.prompts`` (``image-chat`` sources whose
    assistant turn is the ground truth); each reply is judged against it (:func:`judge_reply`). The
    rejected reply is the worst; the chosen one the best if it is perfect, else the ground truth. Prompts
    whose replies are all perfect give no pair (counted as ``train/skipped_all_correct``)."""

    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError(
                f"samples_per_prompt: at least 2 replies are needed, got {self.samples_per_prompt}"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0 to sample, got {self.temperature}")


def judge_reply(reply: str, truth: str, mentions: Mentions) -> float:
    """Score in [0, 1] of a sampled reply against the ground truth. A truth naming objects (by
    ``mentions``) is a description: the F1 of the objects the reply names (every mention of an absent
    object lowers precision) against those of the truth; any other truth is a short answer: exact match
    after VQA normalisation."""
    present = set(mentions(truth))
    if not present:
        return float(normalize_answer(reply) == normalize_answer(truth))
    said = mentions(reply)
    if not said:
        return 0.0
    precision = sum(obj in present for obj in said) / len(said)
    recall = len(set(said) & present) / len(present)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def single_turn(prompts) -> tuple[list[list[dict[str, str]]], list[str]]:
    """The user turns (as one-turn conversations) and ground-truth answers of ``prompts``
    (:class:`~mmfactory.data.multimodal.ImageConversations` of one user turn and its answer each)."""
    conversations, truths = [], []
    for i, messages in enumerate(prompts.messages):
        if len(messages) != 2 or [m["role"] for m in messages] != ["user", "assistant"]:
            raise ConfigError(f"data.prompts: conversation {i} is not one user turn and its answer")
        conversations.append(messages[:1])
        truths.append(messages[1]["content"])
    return conversations, truths


def pairs_fingerprint(
    student: dict[str, str | None],
    model: dict[str, Any],
    seed: int,
    sampling: dict[str, Any],
    batch_size: int,
    prompts: dict[str, Any],
    conversations: list[list[dict[str, str]]],
    truths: list[str],
    tokenizer: str,
) -> dict[str, Any]:
    """What sampled pairs are made from: the student (fingerprints of what it starts from, its model
    config and the stage seed), the sampling settings and generation batch size, the prompt sources' config
    and a digest of their texts, the tokenizer's vocabulary digest."""
    texts = (json.dumps([c, t], ensure_ascii=False) for c, t in zip(conversations, truths, strict=True))
    return {
        "artifact": "on_policy_pairs",
        "student": student,
        "model": model,
        "seed": seed,
        "sampling": sampling,
        "batch_size": batch_size,
        "prompts": prompts,
        "prompt_texts": fingerprint(texts),
        "tokenizer": tokenizer,
    }


@torch.no_grad()
def sample_pairs(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    conversations: list[list[dict[str, str]]],
    truths: list[str],
    images: list[list[np.ndarray]],
    sampling: OnPolicySampling,
    batch_size: int,
    mentions: Mentions,
    bar=None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """``samples_per_prompt`` sampled replies of ``model`` to each conversation, judged against its truth
    (:class:`OnPolicySampling`): the pairs ``{"prompt_index", "prompt", "chosen", "rejected"}`` and the
    counts ``train/skipped_all_correct``, ``train/sampled_replies``. ``bar`` advances per reply."""
    gen = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=True,
        temperature=sampling.temperature,
        batch_size=batch_size,
    )
    torch.manual_seed(sampling.seed)
    was_training = model.training
    replies = []
    for _ in range(sampling.samples_per_prompt):
        replies.append(generate_multimodal_replies(model, processor, conversations, images, gen))
        if bar is not None:
            bar.update(len(conversations))
    model.train(was_training)

    pairs, counts = [], Counter()
    for i, truth in enumerate(truths):
        candidates = [r[i] for r in replies]
        scores = [judge_reply(c, truth, mentions) for c in candidates]
        worst, best = (
            min(range(len(scores)), key=scores.__getitem__),
            max(range(len(scores)), key=scores.__getitem__),
        )
        if scores[worst] == 1.0:
            counts["train/skipped_all_correct"] += 1
            continue
        chosen = candidates[best] if scores[best] == 1.0 else truth
        prompt = conversations[i][0]["content"]
        pairs.append({"prompt_index": i, "prompt": prompt, "chosen": chosen, "rejected": candidates[worst]})
    counts["train/sampled_replies"] = len(truths) * sampling.samples_per_prompt
    return pairs, counts


def write_pairs(folder: Path, pairs: list[dict[str, Any]], counts: Counter[str]) -> None:
    """The files of the pairs artifact, written into ``folder``."""
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    (folder / PAIRS_FILE).write_text(lines, encoding="utf-8")
    (folder / COUNTS_FILE).write_text(json.dumps(dict(counts), indent=1), encoding="utf-8")


def read_pairs(folder: Path, images: Callable[[int], list], counts: Counter[str]) -> list[dict[str, Any]]:
    """The pairs in ``folder`` as ``{"prompt", "chosen", "rejected", "image"}`` (``images(i)``: the images
    of prompt ``i``); the sampling counts are added to ``counts``."""
    # Split on "\n" alone: JSON escapes it in strings, not other line breaks (U+2028, NEL) a reply may hold.
    lines = (folder / PAIRS_FILE).read_text(encoding="utf-8").split("\n")
    records = [json.loads(line) for line in lines if line]
    counts.update(json.loads((folder / COUNTS_FILE).read_text(encoding="utf-8")))
    return [
        {
            "prompt": r["prompt"],
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "image": images(r["prompt_index"])[0],
        }
        for r in records
    ]
