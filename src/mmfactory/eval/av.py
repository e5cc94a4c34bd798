"""Benchmarks of an audio-visual LM: QA accuracy (video, audio, audio-visual, a zero-shot kind) and
captioning CIDEr-D / BLEU-4 (audio, video).

An :class:`AVBenchmark` is a list of items ``{"question", "answer", "type"}`` (QA) or ``{"references"}``
(captions, asked with ``prompt``), each with its media ``{"video", "audio", "sample_rate"}``, and the
streams it is asked with: a model trained on one stream is scored on audio-visual questions with that
stream alone (``streams``), which is how the single-stream rows of Audio-Visual LLM's ablation are made.
Questions are asked as training asks them (the stream placeholders, a newline, the question) and answered
greedily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmfactory.data.av import AUDIO_TOKEN, VIDEO_TOKEN, AVProcessor
from mmfactory.data.benchmarks import AVBenchmark
from mmfactory.data.media import frame_indices
from mmfactory.eval.metrics import cider_d, corpus_bleu, normalize_answer, vqa_accuracy
from mmfactory.eval.mllm import (
    EXAMPLES_SCANNED,
    EXAMPLES_SHOWN,
    GenerationMeter,
    caption_tokens,
    generate_multimodal_replies,
    peak_memory_mb,
)
from mmfactory.examples import Example, right_and_wrong
from mmfactory.models.generation import GenerationConfig

STREAMS = ("video", "audio")


def load_av(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A trained audio-visual model folder (an ``av_sft`` stage's ``final/``) -> ``(model, processor)``,
    on CUDA when available."""
    from mmfactory.models.av_llm import AudioVisualLM

    model = AudioVisualLM.from_pretrained(folder, dtype=dtype)
    processor = AVProcessor.from_pretrained(folder, model.config)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), processor


def ask(question: str, streams: tuple[str, ...]) -> list[dict[str, str]]:
    """One user turn: the placeholders of ``streams`` (video first), then the question."""
    placeholders = {"video": f"{VIDEO_TOKEN}\n", "audio": f"{AUDIO_TOKEN}\n"}
    return [{"role": "user", "content": "".join(placeholders[s] for s in STREAMS if s in streams) + question}]


def _media(item: dict, streams: tuple[str, ...]) -> dict:
    return {
        "video": item.get("video") if "video" in streams else None,
        "audio": item.get("audio") if "audio" in streams else None,
        "sample_rate": item.get("sample_rate"),
    }


def _mentions(bench: AVBenchmark, replies: list[str]) -> dict[str, float]:
    """For items with ``keywords`` (part name -> word, e.g. the colour and shape of a "red star" answer):
    ``{name}_mentions_<part>``, the percent of replies that name that part, as a word."""
    if not bench.items or not all("keywords" in item for item in bench.items):
        return {}
    words = [set(normalize_answer(reply).split()) for reply in replies]
    parts = bench.items[0]["keywords"]
    named = {
        part: [i["keywords"][part] in w for i, w in zip(bench.items, words, strict=True)] for part in parts
    }
    return {f"{bench.name}_mentions_{part}": 100 * float(np.mean(hits)) for part, hits in named.items()}


def filmstrip(video: np.ndarray | None, frames: int) -> list[np.ndarray]:
    """The ``frames`` frames a model sees of ``video`` side by side (uint8 ``[H, frames * W, 3]``), for
    examples; none for a clip without video."""
    if video is None:
        return []
    return [np.concatenate([video[i] for i in frame_indices(len(video), frames, "uniform")], axis=1)]


def _examples(bench: AVBenchmark, replies: list[str], frames: int) -> list[Example]:
    if bench.prompt is not None:
        return [
            Example(
                bench.name, {"reply": r, "a reference": i["references"][0]}, filmstrip(i.get("video"), frames)
            )
            for i, r in zip(bench.items[: EXAMPLES_SHOWN // 2], replies, strict=False)
        ]
    shown = [
        Example(
            f"{i['type']} ({' + '.join(bench.streams)})",
            {"question": i["question"], "answer": r, "truth": i["answer"]},
            filmstrip(i.get("video") if "video" in bench.streams else None, frames),
            correct=vqa_accuracy([r], [i["answer"]])["accuracy"] == 100.0,
        )
        for i, r in zip(bench.items[:EXAMPLES_SCANNED], replies, strict=False)
    ]
    return right_and_wrong(shown, EXAMPLES_SHOWN)


def evaluate_av_benchmark(
    model,
    processor: AVProcessor,
    bench: AVBenchmark,
    cfg: GenerationConfig,
    meter: GenerationMeter | None = None,
    examples: dict[str, list[Example]] | None = None,
) -> dict[str, float]:
    """QA: ``{name}_accuracy`` and ``{name}_accuracy_<type>`` (percent, exact match after VQA
    normalisation) and, where items carry ``keywords``, :func:`_mentions`; captions: ``{name}_cider_d``
    and ``{name}_bleu4``."""
    question = bench.prompt
    conversations = [ask(question or item["question"], bench.streams) for item in bench.items]
    media = [_media(item, bench.streams) for item in bench.items]
    replies = generate_multimodal_replies(model, processor, conversations, media, cfg, meter)
    if examples is not None:
        examples[bench.name] = _examples(bench, replies, processor.video_frames)
    if bench.prompt is None:
        result = vqa_accuracy(replies, [i["answer"] for i in bench.items], [i["type"] for i in bench.items])
        per_type = {f"{bench.name}_accuracy_{t}": r["accuracy"] for t, r in result["per_type"].items()}
        return {f"{bench.name}_accuracy": result["accuracy"], **per_type, **_mentions(bench, replies)}
    references = [item["references"] for item in bench.items]
    cider = cider_d(
        [caption_tokens(r) for r in replies], [[caption_tokens(t) for t in refs] for refs in references]
    )
    return {
        f"{bench.name}_cider_d": cider["cider_d"],
        f"{bench.name}_bleu4": corpus_bleu(replies, references)["bleu"],
    }


def evaluate_av(
    model,
    processor: AVProcessor,
    benchmarks: list[AVBenchmark],
    cfg: GenerationConfig,
    caption_max_new_tokens: int = 32,
    examples: dict[str, list[Example]] | None = None,
) -> dict[str, float]:
    """Every benchmark, then ``gen_tokens_per_s``, ``peak_memory_mb`` and ``params_total_m``; ``examples``
    (when given) receives some answers and captions per benchmark beside the frames the model saw."""
    was_training = model.training
    model.eval()
    meter = GenerationMeter()
    metrics: dict[str, float] = {}
    caption_cfg = GenerationConfig(**{**vars(cfg), "max_new_tokens": caption_max_new_tokens})
    for bench in benchmarks:
        if bench.items:
            bench_cfg = cfg if bench.prompt is None else caption_cfg
            metrics.update(evaluate_av_benchmark(model, processor, bench, bench_cfg, meter, examples))
    if meter.seconds > 0:
        metrics["gen_tokens_per_s"] = meter.tokens / meter.seconds
        metrics["peak_memory_mb"] = peak_memory_mb(model.device)
    metrics["params_total_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    model.train(was_training)
    return metrics
