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


def stage_training_tflops(task: TrainingTask) -> float:
    """Training TFLOPs of the task's whole stage: one step measured on the first ``batch_size`` training
    samples, times steps and accumulation (an estimate where lengths vary between batches)."""
    train, cfg = task.train_dataset(), task.stage.train
    with torch.enable_grad():
        batch = task.collate([train[i] for i in range(min(cfg.batch_size, len(train)))])
        flops = training_step_flops(task, batch)
    return flops * (cfg.max_steps or 0) * cfg.grad_accum / 1e12
