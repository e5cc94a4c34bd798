"""Deterministic, resumable, process-sharded step sampling.

Every optimizer step draws one *global batch* of ``G = batch_size * grad_accum * world_size`` indices
from a per-epoch permutation (seeded by ``seed + epoch``); the global batch is cut into micro-batches,
micro-batch ``m`` of rank ``r`` taking slice ``(m * world_size + r) * batch_size``. The samples an
optimizer step sees therefore do not depend on how they are split across accumulation and processes,
which is what makes 1x8 == 8x1 and 1 process == 2 processes hold, and the global step alone
fixes the data position for resuming.
"""

from __future__ import annotations

from collections.abc import Iterator
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
