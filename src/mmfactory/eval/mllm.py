"""Generation benchmarks of a multimodal LM: VQA accuracy by question type, POPE yes/no metrics per split,
captioning CIDEr-D / BLEU-4, generation throughput and peak memory.

Each benchmark is a list of sample dicts with an ``image`` (uint8 ``[H, W, 3]``) as the world and the
readers of :mod:`mmfactory.data.readers` produce them: VQA ``{"question", "answer", "type"}``, POPE
``{"question", "label"}``, captions ``{"references": [str, ...], "objects"?: [str, ...]}`` (with
``objects``, the names of the objects in the image, and an object vocabulary, ``mentions(text)`` -> the
object names a text says, replies are also scored for object hallucination). The caption prompt and the
vocabulary are arguments: the world's come with its benchmarks
(:func:`mmfactory.data.world_source.world_benchmarks`).
Questions are asked the way training data asks them (``<image>\\n`` + question, one user turn) and
answered greedily.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmfactory.data.benchmarks import CHOICE_LETTERS, Benchmarks, format_choice
from mmfactory.data.multimodal import IMAGE_TOKEN, MultimodalProcessor
from mmfactory.eval.metrics import (
    cider_d,
    circular_accuracy,
    corpus_bleu,
    mme_scores,
    object_hallucination,
    parse_choice,
    parse_yes_no,
    tokenize_13a,
    vqa_accuracy,
    yes_no_metrics,
)
from mmfactory.examples import Example, right_and_wrong
from mmfactory.models.components.moe import moe_param_counts
from mmfactory.models.generation import GenerationConfig, end_of_turn_ids
from mmfactory.models.mllm import MultimodalLM

EXAMPLES_SCANNED = 64  # VQA answers looked at for some right and some wrong ones to show
EXAMPLES_SHOWN = 8


def load_mllm(
    folder: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[MultimodalLM, MultimodalProcessor]:
    """A trained model folder (a stage's ``final/``) -> ``(model, processor)``, on CUDA when available."""
    model = MultimodalLM.from_pretrained(folder, dtype=dtype)
    processor = MultimodalProcessor.from_pretrained(folder, model.config.num_image_tokens)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), processor


@dataclass
class GenerationMeter:
    """Generated tokens (up to and including the stop token) and the seconds spent generating them."""

    tokens: int = 0
    seconds: float = 0.0


@torch.no_grad()
def generate_multimodal_replies(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    conversations: list[list[dict[str, str]]],
    images: list[list[np.ndarray]],
    cfg: GenerationConfig,
    meter: GenerationMeter | None = None,
) -> list[str]:
    """One reply per conversation (each ends with a user turn whose ``<image>`` s match ``images[i]``).

    ``images[i]`` is what ``processor.media_inputs`` takes per conversation: its list of images, or for an
    :class:`~mmfactory.data.av.AVProcessor` its media dict (video, audio, sample rate).

    Prompts are left-padded into batches of ``cfg.batch_size`` so every prompt ends at the same column.
    """
    tokenizer = processor.tokenizer
    stop = end_of_turn_ids(tokenizer, processor.template)
    sampling = (
        {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p} if cfg.do_sample else {}
    )
    device = model.device
    replies: list[str] = []
    for lo in range(0, len(conversations), cfg.batch_size):
        prompts = [processor.prompt(c) for c in conversations[lo : lo + cfg.batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        media = processor.media_inputs(images[lo : lo + cfg.batch_size])
        start = time.perf_counter()
        out = model.generate(
            input_ids.to(device),
            attention_mask.to(device),
            **{name: values.to(device) for name, values in media.items()},
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        elapsed = time.perf_counter() - start
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
            if meter is not None:
                meter.tokens += min(cut + 1, len(row))
        if meter is not None:
            meter.seconds += elapsed
    return replies


def _ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]


def evaluate_vqa(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    samples: list[dict],
    cfg: GenerationConfig,
    meter: GenerationMeter | None = None,
    examples: dict[str, list[Example]] | None = None,
) -> dict[str, float]:
    """``vqa_accuracy`` and ``vqa_accuracy_<type>`` (percent, exact match after VQA normalisation); with
    ``examples``, ``examples["VQA answers"]``: some right and some wrong answers beside their images."""
    replies = generate_multimodal_replies(
        model, processor, [_ask(s["question"]) for s in samples], [[s["image"]] for s in samples], cfg, meter
    )
    types = [s["type"] for s in samples] if all("type" in s for s in samples) else None
    result = vqa_accuracy(replies, [s["answer"] for s in samples], types)
    if examples is not None:
        shown = [
            Example(
                s.get("type", "vqa"),
                {"question": s["question"], "answer": reply, "truth": str(s["answer"])},
                [s["image"]],
                correct=vqa_accuracy([reply], [s["answer"]])["accuracy"] == 100.0,
            )
            for s, reply in zip(samples[:EXAMPLES_SCANNED], replies, strict=False)
        ]
        examples["VQA answers"] = right_and_wrong(shown, EXAMPLES_SHOWN)
    per_type = {f"vqa_accuracy_{kind}": r["accuracy"] for kind, r in result["per_type"].items()}
    return {"vqa_accuracy": result["accuracy"], **per_type}


def evaluate_pope(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    splits: dict[str, list[dict]],
    cfg: GenerationConfig,
    meter: GenerationMeter | None = None,
) -> dict[str, float]:
    """``pope_<split>_{accuracy, precision, recall, f1, yes_ratio}`` (percent) for each POPE split."""
    metrics: dict[str, float] = {}
    for split, probes in splits.items():
        replies = generate_multimodal_replies(
            model,
            processor,
            [_ask(p["question"]) for p in probes],
            [[p["image"]] for p in probes],
            cfg,
            meter,
        )
        result = yes_no_metrics(replies, [p["label"] for p in probes])
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            metrics[f"pope_{split}_{key}"] = result[key]
    return metrics


def evaluate_mme(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    pairs: list[dict],
    cfg: GenerationConfig,
    meter: GenerationMeter | None = None,
) -> dict[str, float]:
    """MME-style yes/no pairs ``{"image", "question", "answer", "type", "pair"}``: ``mme_acc``,
    ``mme_acc_plus`` and both per category (percent; :func:`~mmfactory.eval.metrics.mme_scores`)."""
    replies = generate_multimodal_replies(
        model, processor, [_ask(p["question"]) for p in pairs], [[p["image"]] for p in pairs], cfg, meter
    )
    correct = [parse_yes_no(r) == p["answer"] for r, p in zip(replies, pairs, strict=True)]
    scores = mme_scores(correct, [p["pair"] for p in pairs], [p["type"] for p in pairs])
    return {f"mme_{key}": value for key, value in scores.items()}


def evaluate_mmbench(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    questions: list[dict],
    cfg: GenerationConfig,
    meter: GenerationMeter | None = None,
) -> dict[str, float]:
    """MMBench-style multiple choice ``{"image", "question", "options", "answer"}``, every question asked
    once per rotation of its options: ``mmbench_circular`` and ``mmbench_vanilla`` (percent)."""
    asked = [
        (i, format_choice(q, shift)) for i, q in enumerate(questions) for shift in range(len(q["options"]))
    ]
    replies = generate_multimodal_replies(
        model,
        processor,
        [_ask(prompt) for _, (prompt, _) in asked],
        [[questions[i]["image"]] for i, _ in asked],
        cfg,
        meter,
    )
    correct = [
        parse_choice(r, CHOICE_LETTERS) == right for r, (_, (_, right)) in zip(replies, asked, strict=True)
    ]
    scores = circular_accuracy(correct, [i for i, _ in asked])
    return {f"mmbench_{key}": value for key, value in scores.items()}


def caption_tokens(text: str) -> str:
    """Lowercased, 13a-tokenised words without punctuation tokens (close to COCO's PTB tokenisation)."""
    return " ".join(t for t in tokenize_13a(text.lower()).split() if any(c.isalnum() for c in t))


def evaluate_captions(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    samples: list[dict],
    cfg: GenerationConfig,
    prompt: str,
    mentions: Callable[[str], list[str]] | None = None,
    meter: GenerationMeter | None = None,
    examples: dict[str, list[Example]] | None = None,
) -> dict[str, float]:
    """``caption_cider_d`` (pycocoevalcap's x10 scale) and ``caption_bleu4`` (sacrebleu 13a, 0-100) of the
    replies to ``prompt``; with ``mentions`` and samples that list their ``objects``, ``caption_chair_i`` /
    ``caption_chair_s`` / ``caption_object_recall`` (:func:`~mmfactory.eval.metrics.object_hallucination`
    of the objects ``mentions`` finds in each reply); with ``examples``, ``examples["Captions"]``."""
    replies = generate_multimodal_replies(
        model, processor, [_ask(prompt) for _ in samples], [[s["image"]] for s in samples], cfg, meter
    )
    references = [s["references"] for s in samples]
    cider = cider_d(
        [caption_tokens(r) for r in replies], [[caption_tokens(t) for t in refs] for refs in references]
    )
    metrics = {"caption_cider_d": cider["cider_d"], "caption_bleu4": corpus_bleu(replies, references)["bleu"]}
    if examples is not None:
        examples["Captions"] = [
            Example("caption", {"caption": reply, "a reference": refs[0]}, [s["image"]])
            for s, reply, refs in zip(samples[: EXAMPLES_SHOWN // 2], replies, references, strict=False)
        ]
    if mentions is not None and all("objects" in s for s in samples):
        rates = object_hallucination([mentions(r) for r in replies], [s["objects"] for s in samples])
        metrics.update({f"caption_{key}": rates[key] for key in ("chair_i", "chair_s", "object_recall")})
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def evaluate_mllm(
    model: MultimodalLM,
    processor: MultimodalProcessor,
    benchmarks: Benchmarks,
    cfg: GenerationConfig,
    caption_max_new_tokens: int = 32,
    examples: dict[str, list[Example]] | None = None,
) -> dict[str, float]:
    """Every non-empty benchmark, then ``gen_tokens_per_s`` over all of them and ``peak_memory_mb``, and the
    parameter counts ``params_total_m`` / ``params_activated_m`` (millions; they differ for a sparse MoE).
    ``examples`` (when given) receives answers and captions to show (:mod:`mmfactory.examples`)."""
    was_training = model.training
    model.eval()
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    meter = GenerationMeter()
    metrics: dict[str, float] = {}
    if benchmarks.vqa:
        metrics.update(evaluate_vqa(model, processor, benchmarks.vqa, cfg, meter, examples))
    if benchmarks.pope:
        metrics.update(evaluate_pope(model, processor, benchmarks.pope, cfg, meter))
    if benchmarks.mme:
        metrics.update(evaluate_mme(model, processor, benchmarks.mme, cfg, meter))
    if benchmarks.mmbench:
        metrics.update(evaluate_mmbench(model, processor, benchmarks.mmbench, cfg, meter))
    if benchmarks.captions:
        caption_cfg = GenerationConfig(**{**vars(cfg), "max_new_tokens": caption_max_new_tokens})
        metrics.update(
            evaluate_captions(
                model,
                processor,
                benchmarks.captions,
                caption_cfg,
                benchmarks.caption_prompt,
                benchmarks.mentions,
                meter,
                examples,
            )
        )
    if meter.seconds > 0:
        metrics["gen_tokens_per_s"] = meter.tokens / meter.seconds
        metrics["peak_memory_mb"] = peak_memory_mb(model.device)
    counts = moe_param_counts(model)
    metrics["params_total_m"], metrics["params_activated_m"] = (
        counts["total"] / 1e6,
        counts["activated"] / 1e6,
    )
    model.train(was_training)
    return metrics
