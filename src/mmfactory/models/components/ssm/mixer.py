"""The Mamba mixer (Gu & Dao, 2023): the selective-SSM token mixer of a Mamba block.

Parameter names and initialization follow mamba-ssm's ``Mamba`` and transformers' ``MambaMixer``
(``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so either one's
state dict loads with ``load_state_dict``.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfactory.models.components.ssm.scan import selective_scan


class MambaMixer(nn.Module):
    """in_proj -> causal depthwise conv1d -> SiLU -> selective scan (D skip, ``silu(z)`` gate) -> out_proj.

    Args:
        d_model: model width ``d``.
        d_state: SSM state size ``N`` per channel.
        d_conv: causal depthwise convolution width.
        expand: inner width ``Dm = expand * d_model`` (ARM uses 1, mamba-ssm's default is 2).
        dt_rank: rank of the step-size projection; ``None`` means ``ceil(d_model / 16)``.
        dt_min, dt_max: softplus(dt_proj bias) is initialized log-uniform in ``[dt_min, dt_max]``...
        dt_init_floor: ...and at least this.
        dt_scale: ``dt_proj.weight`` is initialized uniform in ``+-dt_scale / sqrt(dt_rank)``.
        conv_bias: bias in the convolution.
        bias: biases in ``in_proj`` and ``out_proj``.
        chunk_size: time steps per chunk of :func:`selective_scan` (``None``: its default).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, padding=d_conv - 1, groups=self.d_inner, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True  # as mamba-ssm: read by build_optimizer
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba-ssm's S4D-real init: ``A = -[1..N]`` per channel, ``D = 1``, ``dt_proj`` weight uniform in
        ``+-dt_scale / sqrt(dt_rank)`` and bias ``softplus^-1(dt)`` with ``dt`` log-uniform in
        ``[dt_min, dt_max]`` (floored at ``dt_init_floor``). Call it again after a model-wide init that
        overwrote ``dt_proj``."""
        self.A_log.copy_(
            torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log)
        )
        self.D.fill_(1.0)
        bound = self.dt_rank**-0.5 * self.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.empty(self.d_inner).uniform_(math.log(self.dt_min), math.log(self.dt_max))
        dt = log_dt.exp().clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``[Bt, L, d_model]`` -> ``[Bt, L, d_model]``, causal along ``L``."""
        length = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # [Bt, L, Dm] each
        # Causal conv over time, then back to [Bt, L, Dm] memory: the scan reads time steps as rows.
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2).contiguous()
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # [Bt, L, Dm]; the bias goes in with the softplus
        y = selective_scan(
            x.transpose(1, 2),
            dt.transpose(1, 2),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D.float(),
            z=z.transpose(1, 2),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            chunk_size=self.chunk_size,
        )  # [Bt, Dm, L]
        return self.out_proj(y.transpose(1, 2))
