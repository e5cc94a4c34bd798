"""Caption rankings JSONL ``{"id", "image", "captions": [str, ...], "ranks": [int, ...]}``; rank 1 is best."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mmfactory.data.policy import BadReason, BadSampleCounter, BadSampleError, BadSamplePolicy
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    check_text,
    decode_image,
    media_file,
    read_annotation_file,
    require,
)
from mmfactory.data.samples import Samples


def ranking_to_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Every ``(better, worse)`` index pair of captions with different ranks, sorted; ties give no pair.

    ``ranks`` are positive ints, 1 the best: ``[2, 1, 2, 3] -> [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]``.
    """
    for rank in ranks:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"ranks must be positive ints, got {rank!r}")
    return [(i, j) for i, rank_i in enumerate(ranks) for j, rank_j in enumerate(ranks) if rank_i < rank_j]


def ranking_pairs(
    captions: Sequence[str], ranks: Sequence[int], ties: str = "exclude"
) -> list[tuple[int, int, float]]:
    """``(chosen, rejected, target)`` pairs of one ranking: every better-worse pair with target 1, and with
    ``ties="half"`` every tied pair once (lower index first) with target 0.5. Pairs of identical caption
    texts are dropped and a repeated text pair is kept once (deduplicated)."""
    pairs = [(i, j, 1.0) for i, j in ranking_to_pairs(ranks)]
    if ties == "half":
        pairs += [
            (i, j, 0.5) for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] == ranks[j]
        ]
    seen, kept = set(), []
    for i, j, target in pairs:
        key = (
            (captions[i], captions[j], target)
            if target == 1.0
            else (*sorted((captions[i], captions[j])), target)
        )
        if captions[i] != captions[j] and key not in seen:
            seen.add(key)
            kept.append((i, j, target))
    return kept


def _parse_ranking(raw: dict[str, Any], base_dir: Path) -> Fields:
    captions = require(raw, "captions", list)
    if len(captions) < 2:
        raise BadSampleError("a ranking needs at least 2 captions", reason=BadReason.INVALID_RANKS)
    for position, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise BadSampleError(f"captions[{position}] must be a string", reason=BadReason.INVALID_RECORD)
        check_text(caption, f"captions[{position}]")
    ranks = raw.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != len(captions):
        problem = f"'ranks' must be a list with one rank per caption ({len(captions)}), got {ranks!r}"
        raise BadSampleError(problem, reason=BadReason.INVALID_RANKS)
    try:
        pairs = ranking_to_pairs(ranks)
    except ValueError as error:
        raise BadSampleError(str(error), reason=BadReason.INVALID_RANKS) from error
    return {
        "id": require(raw, "id", (str, int)),
        "image": media_file(base_dir, raw.get("image"), "image"),
        "captions": captions,
        "ranks": ranks,
        "pairs": pairs,
    }


def read_rankings(
    path: str | Path,
    *,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
    image_root: str | Path | None = None,
) -> RecordDataset:
    """Samples ``{"id", "image": uint8 [H, W, 3], "captions", "ranks", "pairs": ranking_to_pairs(ranks)}``."""
    return read_annotation_file(
        path,
        _parse_ranking,
        decode_image,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
        base_dir=image_root,
    )


def _record_image(dataset: RecordDataset, index: int):
    return dataset[index]["image"]


def read_rankings_source(source, kind, bad: BadSampleCounter, counts) -> Samples:
    """``format: rankings``: items ``{"id", "captions", "ranks"}``, ``media(i)`` the image (decoded when
    drawn; its file is checked to exist when read)."""
    root = Path(source.image_root).expanduser() if source.image_root else None
    dataset = read_rankings(
        source.path, on_bad_sample=source.on_bad_sample, counter=bad, check_media=False, image_root=root
    )
    items = [{key: r.fields[key] for key in ("id", "captions", "ranks")} for r in dataset.records]
    return Samples(items, partial(_record_image, dataset))
