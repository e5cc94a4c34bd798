"""Training compute, measured: the FLOPs of one optimizer step's forward + backward, counted by PyTorch's
``FlopCounterMode`` (matmuls and convolutions; the elementwise rest is not counted), so that two methods can
be compared at matched training FLOPs."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmfactory.tasks.base import TrainingTask


def training_step_flops(task: TrainingTask, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of ``task(batch)["loss"].backward()`` on one micro-batch; gradients are discarded after."""
    was_training = task.training
    task.train()
    with FlopCounterMode(display=False) as counter:
        task(batch)["loss"].backward()
    for p in task.parameters():
        p.grad = None
    task.train(was_training)
    return int(counter.get_total_flops())


def stage_training_flops(task: TrainingTask, samples: list, steps: int, grad_accum: int = 1) -> float:
    """Training FLOPs of a whole stage: one step measured on ``samples`` (a micro-batch) x steps x
    accumulation (every step sees batches of that size; lengths vary, so this is an estimate)."""
    return float(training_step_flops(task, task.collate(samples)) * steps * grad_accum)
