"""FSDP2 (``fully_shard`` through accelerate): what the loop does differently when each process holds a
shard of the weights.

Under FSDP2 a parameter is a ``DTensor`` whose local part is one process's shard. The loop then:

* checkpoints the *full* trainable weights and optimizer state, gathered by the main process with
  ``torch.distributed.checkpoint.state_dict`` (``full_state_dict``, ``cpu_offload``) and written in the same
  pickle-free format as for one process (:mod:`mmfactory.train.checkpoint`); every process reads the files
  back and keeps its shard (:func:`load_full_state`), so a run resumes exactly, with the same number of
  processes or another;
* gathers the full weights once training ends (:func:`full_model_state`) into an unsharded copy of the task
  on every process, which evaluates and saves ``final/`` as a one-process run does.

These calls are collective: every process makes them, in the same order.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on the main process's CPU


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the processes hold shards of the weights (FSDP), not full copies (one process, DDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (its shard under FSDP2, else the tensor itself)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_training_state(
    task: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict]:
    """The full trainable weights ``{name: tensor}`` and optimizer state (keyed by parameter name), on the
    main process's CPU (empty elsewhere). Collective."""
    weights = get_model_state_dict(
        task, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )
    return weights, get_optimizer_state_dict(task, optimizer, options=GATHERED)


def load_full_state(
    task: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict
) -> None:
    """Give every process its shard of the full ``weights`` (trainable ones) and ``optimizer_state``."""
    set_model_state_dict(task, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(task, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def full_model_state(task: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and persistent buffer of ``task``, full, on every process. Collective."""
    return get_model_state_dict(task, options=StateDictOptions(full_state_dict=True))
