"""Precomputed teacher top-k log-probs on disk, so distillation can train without the teacher in memory.

A cache is a folder of safetensors shards plus ``index.json``. Sample ``i`` of a dataset owns ``n_i`` rows,
one per distilled position (the positions whose next token is a response token, in order), each the
teacher's ``k`` largest log-probs of the full-vocabulary softmax (``logprobs``, stored float16) and their
token ids (``indices``, int32); ``offsets`` (int64, ``[S + 1]`` per shard) delimit the samples of a shard.
Readers open shards lazily and slice one sample at a time, so memory stays flat whatever the cache's size.

``index.json`` records a ``fingerprint`` of what the cache was computed from (teacher folder, ``k``, the
tokenised samples); :func:`open_teacher_topk` refuses a cache whose fingerprint differs instead of
distilling from misaligned logits. The folder is written under a temporary name and renamed when complete,
so an interrupted run leaves no half cache behind.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

INDEX_FILE = "index.json"


def fingerprint(parts: Iterable[str | list[int]]) -> str:
    """sha256 over the string / token-id parts (order matters)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update((part if isinstance(part, str) else ",".join(map(str, part))).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def write_teacher_topk(
    folder: str | Path,
    batches: Iterable[list[int]],
    topk_of_batch: Callable[[list[int]], tuple[Tensor, Tensor, list[int]]],
    k: int,
    fingerprint_hex: str,
    samples_per_shard: int = 4096,
) -> None:
    """Compute and write the cache's files into ``folder`` (created if missing), ``index.json`` last.
    Committing the folder atomically is the caller's job (:func:`mmfactory.artifacts.prepare_artifact`).

    Args:
        folder: the cache folder.
        batches: lists of consecutive sample indices ``0, 1, 2, ...``.
        topk_of_batch: sample indices -> ``(logprobs [N, k], indices [N, k], rows per sample)`` with the
            ``N`` rows of the batch's samples concatenated in order.
        k: top-k width.
        fingerprint_hex: see :func:`fingerprint`.
        samples_per_shard: samples per safetensors file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    logprobs: list[Tensor] = []
    indices: list[Tensor] = []
    counts: list[int] = []
    next_sample = 0

    def flush() -> None:
        name = f"topk-{len(shards):05d}.safetensors"
        offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
        save_file(
            {
                "logprobs": torch.cat(logprobs).to(torch.float16),
                "indices": torch.cat(indices).to(torch.int32),
                "offsets": offsets,
            },
            folder / name,
        )
        shards.append({"file": name, "first_sample": next_sample - len(counts), "num_samples": len(counts)})
        logprobs.clear(), indices.clear(), counts.clear()

    for batch in batches:
        if batch[0] != next_sample or batch != list(range(batch[0], batch[0] + len(batch))):
            raise ValueError(
                f"batches must hold consecutive samples from 0; expected {next_sample}, got {batch}"
            )
        lp, ids, rows = topk_of_batch(batch)
        if lp.shape != ids.shape or lp.shape[-1] != k or lp.shape[0] != sum(rows) or len(rows) != len(batch):
            raise ValueError(
                f"top-k of samples {batch[0]}..{batch[-1]}: shapes {lp.shape} / {ids.shape}, rows {rows}"
            )
        for row_lp, row_ids, n in zip(lp.split(rows), ids.split(rows), rows, strict=True):
            logprobs.append(row_lp)
            indices.append(row_ids)
            counts.append(n)
            next_sample += 1
            if len(counts) == samples_per_shard:
                flush()
    if counts or not shards:
        flush()
    index = {"k": k, "num_samples": next_sample, "fingerprint": fingerprint_hex, "shards": shards}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))


class TeacherTopK:
    """Read access to a cache: ``cache[i]`` -> ``(logprobs float32 [n_i, k], indices int64 [n_i, k])``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX_FILE).read_text())
        self.k: int = self.index["k"]
        self._starts = [shard["first_sample"] for shard in self.index["shards"]]
        self._handles: dict[int, tuple[object, Tensor]] = {}

    def __len__(self) -> int:
        return self.index["num_samples"]

    def _shard(self, number: int) -> tuple[object, Tensor]:
        if number not in self._handles:  # opened on first use, in the process (DataLoader worker) using it
            handle = safe_open(self.folder / self.index["shards"][number]["file"], framework="pt")
            self._handles[number] = (handle, handle.get_tensor("offsets"))
        return self._handles[number]

    def __getitem__(self, sample: int) -> tuple[Tensor, Tensor]:
        if not 0 <= sample < len(self):
            raise IndexError(f"sample {sample} is outside the cache's {len(self)} samples ({self.folder})")
        number = bisect.bisect_right(self._starts, sample) - 1
        handle, offsets = self._shard(number)
        local = sample - self._starts[number]
        lo, hi = int(offsets[local]), int(offsets[local + 1])
        return (
            handle.get_slice("logprobs")[lo:hi].float(),
            handle.get_slice("indices")[lo:hi].long(),
        )

    def __getstate__(self) -> dict:  # file handles do not pickle: workers reopen them
        return {**self.__dict__, "_handles": {}}


def open_teacher_topk(folder: str | Path, k: int, fingerprint_hex: str) -> TeacherTopK | None:
    """The cache in ``folder`` if it exists and matches; ``None`` if there is none; an error if it differs."""
    folder = Path(folder)
    if not (folder / INDEX_FILE).is_file():
        return None
    cache = TeacherTopK(folder)
    if cache.k != k or cache.index["fingerprint"] != fingerprint_hex:
        raise ValueError(
            f"the teacher top-k cache in {folder} was computed for another teacher, k or data "
            f"(its k {cache.k}, requested {k}): delete it or point options.teacher_topk_dir elsewhere"
        )
    return cache
