"""Compute, measured: the FLOPs a function runs, counted by PyTorch's ``FlopCounterMode`` (matmuls,
convolutions and attention; the elementwise rest is not counted), so that methods can be compared at matched
training FLOPs and a masked encoder's savings read off directly."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

if TYPE_CHECKING:
    from mmfactory.tasks.base import TrainingTask


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FLOP table covers the CUDA attention kernels but not the CPU one that SDPA runs here.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``fn()`` runs (elementwise ops not counted)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def training_step_flops(module: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of ``module(batch)["loss"].backward()`` on one micro-batch (a task in train mode); gradients
    are discarded after and the module's mode restored."""
    was_training = module.training
    module.train()
    flops = count_flops(lambda: module(batch)["loss"].backward())
    for p in module.parameters():
        p.grad = None
    module.train(was_training)
    return int(flops)


def stage_training_tflops(task: TrainingTask) -> float:
    """Training TFLOPs of the task's whole stage: one step measured on the first ``batch_size`` training
    samples, times steps and accumulation (an estimate where lengths vary between batches)."""
    train, cfg = task.train_dataset(), task.stage.train
    with torch.enable_grad():
        batch = task.collate([train[i] for i in range(min(cfg.batch_size, len(train)))])
        flops = training_step_flops(task, batch)
    return flops * (cfg.max_steps or 0) * cfg.grad_accum / 1e12
