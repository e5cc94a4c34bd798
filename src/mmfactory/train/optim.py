"""Trainable-set selection, optimizer and learning-rate schedule for a stage."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
from torch import nn

from mmfactory.config import OptimizerConfig, ScheduleConfig
from mmfactory.tasks.base import TrainingTask


def select_trainable(module: nn.Module, trainable: list[str], frozen: list[str]) -> list[str]:
    """Set ``requires_grad`` from glob patterns over parameter names; ``frozen`` wins over ``trainable``.

    Parameters a task froze itself (``requires_grad=False`` before this call, e.g. a teacher) stay frozen.
    Returns the trainable names; a pattern that matches nothing is an error (a typo would otherwise
    silently train the wrong set).
    """
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    for pattern in [*trainable, *frozen]:
        if not any(fnmatchcase(n, pattern) for n in names):
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(
                f"parameter pattern {pattern!r} matches no trainable-candidate parameter ({sample})"
            )
    selected = []
    for name, param in module.named_parameters():
        keep = (
            param.requires_grad
            and any(fnmatchcase(name, p) for p in trainable)
            and not any(fnmatchcase(name, p) for p in frozen)
        )
        param.requires_grad_(keep)
        if keep:
            selected.append(name)
    if not selected:
        raise ValueError(f"no parameter is trainable with trainable={trainable} frozen={frozen}")
    return selected


def build_optimizer(module: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW/SGD over trainable parameters; no weight decay on 1-D parameters (biases, norms) nor on
    parameters marked ``param._no_weight_decay = True`` (as mamba-ssm marks ``A_log`` and ``D``).

    A :class:`TrainingTask` may scale the learning rate per parameter (:meth:`TrainingTask.lr_scale`, e.g.
    layer-wise decay): parameters are grouped by (scale, decay), largest scale first, so the first
    group's rate (the one logged) is the stage's whenever some parameter trains at full rate.
    """
    lr_scale = module.lr_scale if isinstance(module, TrainingTask) else (lambda name: 1.0)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            decay = param.ndim >= 2 and not getattr(param, "_no_weight_decay", False)
            groups.setdefault((lr_scale(name), decay), []).append(param)
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
        for (scale, decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
    ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then cosine/linear/constant."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.kind == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
