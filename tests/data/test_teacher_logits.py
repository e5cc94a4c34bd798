"""The on-disk teacher top-k cache: rows per sample across shard boundaries, fingerprints, atomic writes."""

import pytest
import torch

from mmfactory.data.teacher_logits import (
    TeacherTopK,
    fingerprint,
    open_teacher_topk,
    write_teacher_topk,
)

K = 3
ROWS = [2, 0, 5, 1, 3, 4, 1]  # response tokens per sample (a sample may have none left)


def fake_topk(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Row r of sample i holds log-probs -(i + r / 10) - k / 100 and ids 10 i + r + k."""
    lp, ids = [], []
    for i in indices:
        for r in range(ROWS[i]):
            lp.append([-(i + r / 10) - k / 100 for k in range(K)])
            ids.append([10 * i + r + k for k in range(K)])
    return torch.tensor(lp).reshape(-1, K), torch.tensor(ids).reshape(-1, K), [ROWS[i] for i in indices]


def test_every_sample_reads_back_its_rows_across_shards(tmp_path):
    batches = [[0, 1, 2], [3, 4], [5, 6]]
    write_teacher_topk(tmp_path / "cache", batches, fake_topk, K, "abc", samples_per_shard=3)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "index.json",
        "topk-00000.safetensors",
        "topk-00001.safetensors",
        "topk-00002.safetensors",
    ]
    assert not (tmp_path / "cache.tmp").exists()
    cache = TeacherTopK(tmp_path / "cache")
    assert len(cache) == len(ROWS)
    for i, rows in enumerate(ROWS):
        logprobs, ids = cache[i]
        want_lp, want_ids, _ = fake_topk([i])
        assert logprobs.dtype == torch.float32 and ids.dtype == torch.int64 and logprobs.shape == (rows, K)
        torch.testing.assert_close(logprobs, want_lp, atol=5e-3, rtol=1e-3)  # stored as float16
        assert torch.equal(ids, want_ids)
    with pytest.raises(IndexError, match="outside the cache's 7 samples"):
        cache[7]


def test_a_cache_is_reused_only_for_the_same_fingerprint_and_k(tmp_path):
    assert open_teacher_topk(tmp_path / "cache", K, "abc") is None
    write_teacher_topk(tmp_path / "cache", [[0, 1]], fake_topk, K, "abc")
    assert len(open_teacher_topk(tmp_path / "cache", K, "abc")) == 2
    with pytest.raises(ValueError, match="another teacher, k or data"):
        open_teacher_topk(tmp_path / "cache", K, "abd")
    with pytest.raises(ValueError, match="its k 3, requested 4"):
        open_teacher_topk(tmp_path / "cache", 4, "abc")


def test_batches_out_of_order_or_with_bad_shapes_are_refused_and_leave_no_index(tmp_path):
    with pytest.raises(ValueError, match="consecutive samples from 0"):
        write_teacher_topk(tmp_path / "c", [[0, 1], [3]], fake_topk, K, "x")
    with pytest.raises(ValueError, match="shapes"):
        write_teacher_topk(tmp_path / "c", [[0, 1]], lambda b: (*fake_topk(b)[:2], [2, 1]), K, "x")
    assert not (tmp_path / "c" / "index.json").exists()  # nothing would open it as a cache


def test_fingerprints_see_order_and_boundaries():
    assert fingerprint(["a", [1, 2]]) != fingerprint([[1, 2], "a"])
    assert fingerprint([[1, 2], [3]]) != fingerprint([[1], [2, 3]])
    assert fingerprint(["x"]) == fingerprint(["x"])
