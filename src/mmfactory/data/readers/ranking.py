"""Caption rankings JSONL ``{"id", "image", "captions": [str, ...], "ranks": [int, ...]}``; rank 1 is best."""

from __future__ import annotations

from collections.abc import Sequence
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


def ranking_to_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Every ``(better, worse)`` index pair of captions with different ranks, sorted; ties give no pair.

    ``ranks`` are positive ints, 1 the best: ``[2, 1, 2, 3] -> [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]``.
    """
    for rank in ranks:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"ranks must be positive ints, got {rank!r}")
    return [(i, j) for i, rank_i in enumerate(ranks) for j, rank_j in enumerate(ranks) if rank_i < rank_j]


def _parse_ranking(raw: dict[str, Any], base_dir: Path) -> Fields:
    captions = require(raw, "captions", list)
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
    )
