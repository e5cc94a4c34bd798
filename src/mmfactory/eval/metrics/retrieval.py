"""Retrieval metrics from a similarity matrix: R@K (%), median rank and mean rank.

A query's rank is the 1-based position of its best-placed correct item when items are sorted by
decreasing similarity. Ties are broken against the query: an incorrect item with the same score as
the best correct one counts as ranked above it, so a constant similarity matrix scores the worst
possible ranks rather than R@1 = 100. With several correct items (video->text, where each video has
many captions), the rank is the best rank among them, as in CLIP4Clip / MSR-VTT multi-caption
evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _as_numpy(array: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    """NumPy view of an array-like; torch tensors (any device or dtype) without importing torch."""
    if hasattr(array, "detach"):
        tensor = array.detach().cpu()
        return (tensor.double() if tensor.is_floating_point() else tensor).numpy()
    return np.asarray(array)


def retrieval_ranks(
    similarity: np.ndarray | torch.Tensor,
    positives: np.ndarray | torch.Tensor | Sequence[Iterable[int]],
) -> np.ndarray:
    """1-based rank of the best correct item of each query.

    Args:
        similarity: ``[num_queries, num_items]`` scores, higher = more similar.
        positives: boolean mask ``[num_queries, num_items]``, or for each query the indices of its
            correct items; every query needs at least one.

    Returns:
        ``[num_queries]`` int64 ranks in ``1..num_items``.
    """
    scores = _as_numpy(similarity).astype(np.float64)
    if scores.ndim != 2:
        raise ValueError(f"similarity must be [num_queries, num_items], got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("similarity contains NaN")
    if hasattr(positives, "shape"):
        is_correct = _as_numpy(positives).astype(bool)
    else:
        if len(positives) != scores.shape[0]:
            raise ValueError(f"{len(positives)} positive sets for {scores.shape[0]} queries")
        is_correct = np.zeros(scores.shape, dtype=bool)
        for query, items in enumerate(positives):
            is_correct[query, list(items)] = True
    if is_correct.shape != scores.shape:
        raise ValueError(f"positives shape {is_correct.shape} != similarity shape {scores.shape}")
    if not is_correct.any(axis=1).all():
        raise ValueError(f"queries without a correct item: {np.flatnonzero(~is_correct.any(axis=1))[:10]}")
    best_correct = np.where(is_correct, scores, -np.inf).max(axis=1, keepdims=True)  # [Q, 1]
    return 1 + ((scores >= best_correct) & ~is_correct).sum(axis=1)


def retrieval_metrics(
    similarity: np.ndarray | torch.Tensor,
    positives: np.ndarray | torch.Tensor | Sequence[Iterable[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """``{"R@1", "R@5", "R@10" (percent), "MdR", "MnR"}`` of one retrieval direction.

    Shapes as in :func:`retrieval_ranks`.
    """
    ranks = retrieval_ranks(similarity, positives)
    metrics = {f"R@{k}": 100.0 * float(np.mean(ranks <= k)) for k in ks}
    metrics["MdR"] = float(np.median(ranks))
    metrics["MnR"] = float(np.mean(ranks))
    return metrics


def text_video_retrieval(
    similarity: np.ndarray | torch.Tensor,
    video_of_text: np.ndarray | torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """Both directions for captions that each describe one video (several captions per video allowed).

    Args:
        similarity: ``[num_texts, num_videos]`` text-video scores.
        video_of_text: ``[num_texts]`` index of the video each caption describes.

    Returns:
        ``{"t2v": metrics over texts, "v2t": metrics over videos}``; in v2t a video's rank is the best
        rank among its captions. Every video needs at least one caption.
    """
    scores = _as_numpy(similarity)
    video_index = _as_numpy(video_of_text).astype(np.int64)
    if video_index.shape != (scores.shape[0],):
        raise ValueError(f"video_of_text must have shape ({scores.shape[0]},), got {video_index.shape}")
    text_matches_video = video_index[:, None] == np.arange(scores.shape[1])[None, :]  # [T, V]
    return {
        "t2v": retrieval_metrics(scores, text_matches_video, ks),
        "v2t": retrieval_metrics(scores.T, text_matches_video.T, ks),
    }
