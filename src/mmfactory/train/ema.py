"""Exponential moving average of the trainable weights (timm's ``ModelEma``, used by ARM's fine-tuning).

:class:`WeightEMA` holds a shadow copy of each trainable parameter as a *persistent buffer*, so the loop's
checkpoints save it and a resumed run continues the same average. After every optimizer step,
``shadow = decay * shadow + (1 - decay) * weight``; :meth:`WeightEMA.swapped_in` puts the averages in the
parameters' place for an evaluation and restores the live weights afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _buffer_name(name: str) -> str:
    return name.replace(".", "__")


class WeightEMA(nn.Module):
    """The shadow weights of ``parameters`` (name -> trainable parameter), decaying by ``decay`` per step."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.tracked = dict(parameters)
        for name, param in self.tracked.items():
            self.register_buffer(_buffer_name(name), param.detach().clone().float())

    def shadow(self, name: str) -> torch.Tensor:
        return getattr(self, _buffer_name(name))

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.tracked.items():
            self.shadow(name).lerp_(param.detach().float(), 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the parameters' place inside the ``with`` block."""
        live = {name: param.detach().clone() for name, param in self.tracked.items()}
        for name, param in self.tracked.items():
            param.copy_(self.shadow(name))
        try:
            yield
        finally:
            for name, param in self.tracked.items():
                param.copy_(live[name])
