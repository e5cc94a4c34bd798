"""Deterministic, resumable, process-sharded step sampling.

Every optimizer step draws one *global batch* of ``G = batch_size * grad_accum * world_size`` indices
from a per-epoch permutation (seeded by ``seed + epoch``); the global batch is cut into micro-batches,
micro-batch ``m`` of rank ``r`` taking slice ``(m * world_size + r) * batch_size``. The samples an
optimizer step sees therefore do not depend on how they are split across accumulation and processes,
which is what makes 1x8 == 8x1 and 1 process == 2 processes hold, and the global step alone
fixes the data position for resuming.

With ``lengths`` (LLaVA's modality-length convention: a text-only sample's length is negative), each
global batch is sorted before it is cut: multimodal samples first, then text-only ones, each longest
first (ties in draw order). Micro-batches then hold samples of one modality and similar lengths (less
padding), while the samples of a step, and so its loss, are those of the unsorted run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mmfactory.data.policy import DataError


@dataclass
class StepSampler:
    num_samples: int
    batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    lengths: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise DataError(
                f"dataset of {self.num_samples} samples is smaller than one global batch of "
                f"{self.global_batch} (batch_size {self.batch_size} x grad_accum {self.grad_accum} "
                f"x {self.world_size} processes)"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Incomplete final global batches are dropped so every step has the same size."""
        return self.num_samples // self.global_batch

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=gen)

    def _micro_batches(self, order: torch.Tensor, step: int) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches (index lists) of global batch ``step``."""
        start = step * self.global_batch
        if self.lengths is not None:
            chunk = order[start : start + self.global_batch].tolist()
            ranked = sorted(
                range(len(chunk)), key=lambda j: (self.lengths[chunk[j]] < 0, -abs(self.lengths[chunk[j]]), j)
            )
            order, start = torch.tensor([chunk[j] for j in ranked]), 0
        out = []
        for micro in range(self.grad_accum):
            lo = start + (micro * self.world_size + self.rank) * self.batch_size
            out.append(order[lo : lo + self.batch_size].tolist())
        return out

    def micro_batches(self, start_step: int = 0) -> Iterator[list[int]]:
        """Endless stream of this rank's micro-batches, ``grad_accum`` per optimizer step, from a step on.

        Every step consumes one global batch, so the data position is the global step itself:
        step ``s`` is step ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``.
        """
        epoch, step = divmod(start_step, self.steps_per_epoch)
        while True:
            order = self._order(epoch)
            for s in range(step, self.steps_per_epoch):
                yield from self._micro_batches(order, s)
            epoch, step = epoch + 1, 0
