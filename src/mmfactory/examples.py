"""Examples a person wants to see beside a stage's numbers, written by its evaluation and shown by
:mod:`mmfactory.report`: answers beside the image and the truth, drawn images with their prompts,
retrievals, kept and rejected pool items, styled notes with their unsupported claims.

A stage writes ``STAGE/examples/<group>.jsonl`` (one :class:`Example` per line) and the PNGs the lines
name (``<group>-<i>.png``, relative to ``examples/``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mmfactory.atomic import write_atomic

EXAMPLES_DIR = "examples"


@dataclass
class Example:
    """One example: ``fields`` are shown in order (e.g. question, answer, truth); ``correct`` colours it
    (None: neither right nor wrong); ``marks`` lists substrings of a field to highlight (e.g. a note's
    unsupported claims); ``images`` are PIL images or uint8 arrays [H, W, 3] (or [H, W])."""

    title: str
    fields: dict[str, str]
    images: list = field(default_factory=list)
    correct: bool | None = None
    marks: dict[str, list[str]] = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "examples"


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"example images are PIL images or uint8 arrays, got {array.dtype}")
    return Image.fromarray(array)


def write_examples(stage_dir: Path, group: str, examples: list[Example]) -> Path:
    """Write ``examples`` as ``stage_dir/examples/<group>.jsonl`` and their PNGs; returns the JSONL path.
    The group's title is kept as written (the file name is its slug)."""
    out = Path(stage_dir) / EXAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    slug = _slug(group)
    lines = []
    for i, example in enumerate(examples):
        names = []
        for j, image in enumerate(example.images):
            name = f"{slug}-{i}-{j}.png"
            _to_pil(image).save(out / name)
            names.append(name)
        record = {**asdict(example), "images": names, "group": group}
        lines.append(json.dumps(record, ensure_ascii=False))
    path = out / f"{slug}.jsonl"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def read_examples(stage_dir: Path) -> dict[str, list[dict]]:
    """``{group title: [record, ...]}`` of a stage folder (images as paths), in file-name order."""
    groups: dict[str, list[dict]] = {}
    for path in sorted((Path(stage_dir) / EXAMPLES_DIR).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                record["images"] = [path.parent / name for name in record["images"]]
                groups.setdefault(record["group"], []).append(record)
    return groups


def right_and_wrong(examples: list[Example], n: int) -> list[Example]:
    """Up to ``n`` examples, half right and half wrong where both exist (the first of each, in order)."""
    right = [e for e in examples if e.correct]
    wrong = [e for e in examples if e.correct is False]
    k = min(len(wrong), max(n // 2, n - len(right)))
    return right[: n - k] + wrong[:k]


def retrieval_examples(
    similarity, texts: list[str], item_of_text: list[int], thumbnail, n: int = 6, k: int = 3
) -> list[Example]:
    """Text-to-item retrievals to show: for the first caption of each of the first ``n`` items, its top
    ``k`` items by ``similarity`` (``[T, I]`` tensor) drawn by ``thumbnail(item) -> image``; right when the
    top-1 item is the caption's own."""
    shown, seen = [], set()
    for t, item in enumerate(item_of_text):
        if item in seen or len(shown) == n:
            continue
        seen.add(item)
        top = similarity[t].topk(min(k, similarity.shape[1])).indices.tolist()
        rank = int((similarity[t] > similarity[t, item]).sum()) + 1
        fields = {"query": texts[t], "retrieved": f"top {len(top)} left to right; the true item ranks {rank}"}
        shown.append(Example("text -> item", fields, [thumbnail(i) for i in top], correct=top[0] == item))
    return shown
