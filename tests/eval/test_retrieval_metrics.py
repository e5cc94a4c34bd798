"""Retrieval ranks and R@K / MdR / MnR against a naive sort-and-scan loop and hand-computed values."""

import statistics

import numpy as np
import pytest
import torch

from mmfactory.eval.metrics import retrieval_metrics, retrieval_ranks, text_video_retrieval


def naive_metrics(similarity: np.ndarray, positives: list[set[int]]) -> dict[str, float]:
    """Sort each row (incorrect items first among equal scores) and take the first correct position."""
    ranks = []
    for query, correct in enumerate(positives):
        order = sorted(
            range(similarity.shape[1]), key=lambda item: (-similarity[query, item], item in correct)
        )
        ranks.append(next(position for position, item in enumerate(order, start=1) if item in correct))
    metrics = {f"R@{k}": 100.0 * sum(rank <= k for rank in ranks) / len(ranks) for k in (1, 5, 10)}
    return metrics | {"MdR": float(statistics.median(ranks)), "MnR": statistics.mean(ranks)}


@pytest.mark.parametrize("seed", range(3))
def test_text_video_retrieval_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    num_videos = 40
    video_of_text = np.concatenate(
        [np.arange(num_videos), rng.integers(0, num_videos, size=60)]
    )  # 1-4 captions
    # integer scores with many ties, made informative by a bonus on the matching video
    similarity = rng.integers(0, 12, size=(len(video_of_text), num_videos)).astype(np.float32)
    similarity[np.arange(len(video_of_text)), video_of_text] += rng.integers(0, 8, size=len(video_of_text))

    result = text_video_retrieval(torch.from_numpy(similarity), torch.from_numpy(video_of_text))

    expected_t2v = naive_metrics(similarity, [{int(v)} for v in video_of_text])
    captions = [set(np.flatnonzero(video_of_text == v).tolist()) for v in range(num_videos)]
    expected_v2t = naive_metrics(similarity.T, captions)
    assert result["t2v"] == pytest.approx(expected_t2v)
    assert result["v2t"] == pytest.approx(expected_v2t)
    assert 0 < result["t2v"]["R@1"] < 100 and 0 < result["v2t"]["R@1"] < 100


def test_ranks_hand_computed():
    similarity = np.array(
        [
            [0.9, 0.1, 0.5, 0.3],  # correct {0}: best -> rank 1
            [0.9, 0.1, 0.5, 0.3],  # correct {1}: last -> rank 4
            [0.2, 0.7, 0.7, 0.1],  # correct {2}: tied with incorrect item 1 -> rank 2
            [0.2, 0.6, 0.8, 0.1],  # correct {1, 3}: best correct is item 1, behind item 2 -> rank 2
        ]
    )
    positives = [[0], [1], [2], [1, 3]]
    np.testing.assert_array_equal(retrieval_ranks(similarity, positives), [1, 4, 2, 2])
    mask = np.zeros((4, 4), dtype=bool)
    for query, items in enumerate(positives):
        mask[query, items] = True
    assert retrieval_metrics(similarity, mask, ks=(1, 2)) == {
        "R@1": 25.0,
        "R@2": 75.0,
        "MdR": 2.0,
        "MnR": 2.25,
    }


def test_constant_similarity_gets_worst_ranks():
    ranks = retrieval_ranks(torch.zeros(5, 5, dtype=torch.bfloat16), [[i] for i in range(5)])
    np.testing.assert_array_equal(ranks, [5] * 5)


def test_query_without_correct_item_is_an_error():
    with pytest.raises(ValueError, match="without a correct item"):
        retrieval_ranks(np.zeros((2, 3)), [[0], []])
    with pytest.raises(ValueError, match="shape"):
        text_video_retrieval(np.zeros((3, 2)), [0, 1])
