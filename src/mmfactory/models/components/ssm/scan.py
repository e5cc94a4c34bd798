"""Selective scan (Mamba's S6 layer): a sequential fp32 reference and a fast pure-PyTorch version.

Shapes follow mamba-ssm's ``selective_scan_fn``: ``u``, ``delta``, ``z`` are ``[Bt, Dm, L]``, ``A`` is
``[Dm, N]`` (negative), ``B`` and ``C`` are input-dependent ``[Bt, N, L]``, ``D`` and ``delta_bias`` are
``[Dm]``. With ``delta <- softplus(delta + delta_bias)`` (each step optional) and a state ``x`` of
``[Bt, Dm, N]`` starting at zero::

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t
    y_t = C_t . x_t + D * u_t
    out = y * silu(z)

Both functions compute in float32 and return ``u``'s dtype, as mamba-ssm's kernel does.

Design note. The usual pure-PyTorch chunked scan for Mamba-1 works in log space: ``S = cumsum(delta * A)``
inside a chunk and ``x_t = exp(S_t) * cumsum_s(exp(-S_s) * b_s)``. ``exp(-S)`` overflows once a chunk
decays by more than ``e^88``, and the safe form (a ``T x T`` segment-sum matrix per ``(d, n)``, since A
is per channel and state) costs ``T`` times more. On CPU it is also slower (6-29x, see
``benchmarks/results/ssm_scan.md``): the scan is bound by passes over ``[L, Bt, N, Dm]`` memory, and
:func:`selective_scan` makes the fewest, running the recurrence itself on cache-sized chunks.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Plain step-by-step selective scan in float32 (the reference the fast path is tested against).

    Args:
        u: ``[Bt, Dm, L]`` input.
        delta: ``[Bt, Dm, L]`` step sizes (before ``delta_bias`` / softplus).
        A: ``[Dm, N]`` state matrix (diagonal per channel, negative).
        B, C: ``[Bt, N, L]`` input-dependent input and output projections.
        D: ``[Dm]`` skip connection.
        z: ``[Bt, Dm, L]`` gate; the output is multiplied by ``silu(z)``.
        delta_bias: ``[Dm]`` added to ``delta``.
        delta_softplus: apply softplus to ``delta`` (after the bias).

    Returns:
        ``[Bt, Dm, L]`` in ``u``'s dtype.
    """
    out_dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [Bt, Dm, N]
    ys = []
    for u_t, delta_t, B_t, C_t in zip(
        u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True
    ):
        state = torch.exp(delta_t[..., None] * A) * state + (delta_t * u_t)[..., None] * B_t[:, None, :]
        ys.append((state * C_t[:, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Fast selective scan: same arguments, shapes and result as :func:`selective_scan_ref`.

    The sequence is cut into chunks of ``chunk_size`` steps (default: about ``2**18`` state elements on
    CPU, so a chunk's ``[T, Bt, N, Dm]`` tensors fit a 1 MiB L2 cache, the fastest setting measured;
    ``2**26`` on GPU, not measured). Per chunk, the decays ``exp(delta * A)`` and inputs
    ``delta * B * u`` are whole-chunk ops, the recurrence is one in-place ``addcmul_`` per step, the
    readout ``C . x`` one bmm, and the last state enters the next chunk. Every factor is a decay in
    ``(0, 1]``: nothing overflows, however negative ``delta * A`` gets.

    The backward is hand-written: it rebuilds the chunks last to first from the chunk-entry states saved
    by the forward and runs the adjoint recurrence through each. Like mamba-ssm's kernel it saves the
    ``[Bt, Dm, L]`` inputs (plus the pre-gate output when ``z`` is given), never the ``N``-times larger
    per-step states.

    Args:
        chunk_size: time steps per chunk; ``None`` picks one from the sizes and the device.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if chunk_size is None:
        budget = 2**26 if u.device.type == "cuda" else 2**18
        chunk_size = max(1, budget // (u.shape[0] * u.shape[1] * A.shape[1]))
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)


def _check_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    if u.ndim != 3 or A.ndim != 2 or u.shape[-1] == 0:
        raise ValueError(
            f"expected u [Bt, Dm, L>0] and A [Dm, N], got u {list(u.shape)} and A {list(A.shape)}"
        )
    batch, channels, length = u.shape
    expected = {
        "delta": (delta, (batch, channels, length)),
        "A": (A, (channels, A.shape[1])),
        "B": (B, (batch, A.shape[1], length)),
        "C": (C, (batch, A.shape[1], length)),
        "D": (D, (channels,)),
        "z": (z, (batch, channels, length)),
        "delta_bias": (delta_bias, (channels,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {list(tensor.shape)}, expected {list(shape)}")


def _linear_recurrence_(decay: Tensor, values: Tensor, reverse: bool = False) -> Tensor:
    """Solve ``h_t = decay_t * h_{t-1} + values_t`` along dim 0, in place of ``values`` (whatever
    ``values[0]`` holds is ``h_0``). ``reverse=True`` solves the adjoint ``h_t = decay_{t+1} * h_{t+1}
    + values_t`` from the last step back. Both tensors are ``[T, ...]``."""
    decays, hs = decay.unbind(0), values.unbind(0)
    if reverse:
        for t in range(len(hs) - 2, -1, -1):
            hs[t].addcmul_(decays[t + 1], hs[t + 1])
    else:
        for t in range(1, len(hs)):
            hs[t].addcmul_(decays[t], hs[t - 1])
    return values


class _Chunk:
    """The inputs at time ``steps`` in float32, time-major and contiguous: ``u``, ``delta`` (after the
    bias, before the softplus), step sizes ``dt``, ``dt_u = dt * u`` and ``z`` are ``[T, Bt, Dm]``; ``B``
    and ``C`` are ``[T, Bt, N]``."""

    def __init__(self, steps, u, delta, B, C, z, delta_bias, delta_softplus):
        self.u, self.B, self.C = _load(u, steps), _load(B, steps), _load(C, steps)
        self.delta = _load(delta, steps)
        if delta_bias is not None:
            self.delta.add_(delta_bias.float())
        self.dt = F.softplus(self.delta) if delta_softplus else self.delta
        self.dt_u = self.dt * self.u
        self.z = None if z is None else _load(z, steps)

    def states(self, A_t: Tensor, initial: Tensor, decay: Tensor, states: Tensor) -> None:
        """Write the decays ``exp(dt * A)`` and the states ``x_t`` (``[T, Bt, N, Dm]``) into ``decay`` and
        ``states``, given ``A_t = A.T`` ``[N, Dm]`` and the state before the chunk, ``[Bt, N, Dm]``."""
        torch.mul(self.dt[:, :, None, :], A_t, out=decay).exp_()
        torch.mul(self.dt_u[:, :, None, :], self.B[..., None], out=states)
        states[0].addcmul_(decay[0], initial)
        _linear_recurrence_(decay, states)


def _load(x: Tensor, steps: slice) -> Tensor:
    """``x[..., steps]`` of a ``[Bt, X, L]`` tensor as a new contiguous float32 ``[T, Bt, X]``."""
    view = x[..., steps].permute(2, 0, 1)
    return torch.empty(view.shape, dtype=torch.float32, device=x.device).copy_(view)


def _time_rows(x: Tensor | None) -> Tensor | None:
    """``x`` ``[Bt, X, L]`` with its memory laid out ``[Bt, L, X]``, so :func:`_load` copies whole rows
    (a mixer's activations already are; mamba-ssm's contiguous ``[Bt, X, L]`` gets one transposing copy,
    much cheaper than gathering every chunk with stride ``L``)."""
    if x is None or x.stride(1) == 1 or x.shape[1] == 1:
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _time_major(x: Tensor) -> Tensor:
    """A ``[Bt, L, X]`` result seen as ``[L, Bt, X]``, to write a chunk's rows into."""
    return x.transpose(0, 1)


def _weighted_sum_over_states(weights: Tensor, states: Tensor) -> Tensor:
    """``out[t, b, d] = sum_n weights[t, b, n] * states[t, b, n, d]`` as one bmm, ``[T, Bt, Dm]``."""
    steps, batch, state_size, channels = states.shape
    out = torch.bmm(
        weights.view(steps * batch, 1, state_size), states.view(steps * batch, state_size, channels)
    )
    return out.view(steps, batch, channels)


class _SelectiveScan(torch.autograd.Function):
    """Chunk by chunk: a chunk's inputs are gathered time-major, its ``[T, Bt, N, Dm]`` work tensors live
    in workspaces allocated once (on CPU a fresh multi-MiB tensor per op costs more in page faults than
    the op), and full-length results go into ``[Bt, L, X]`` tensors, returned as ``[Bt, X, L]`` views:
    the layout of a mixer's ``[Bt, L, X]`` activations, so its transposes back are free."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        batch, channels, length = u.shape
        chunks = [slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]
        A_t, D32 = A.float().T.contiguous(), None if D is None else D.float()
        entry_states = u.new_zeros(len(chunks), batch, A.shape[1], channels, dtype=torch.float32)
        decay_buffer, states_buffer = (
            entry_states.new_empty(chunks[0].stop, *entry_states.shape[1:]) for _ in range(2)
        )
        out = u.new_empty(batch, length, channels, dtype=torch.float32)
        pre_gate = None if z is None else torch.empty_like(out)  # C . x + D * u, kept for grad_z
        u_rows, delta_rows, B_rows, C_rows, z_rows = map(_time_rows, (u, delta, B, C, z))
        for i, steps in enumerate(chunks):
            chunk = _Chunk(steps, u_rows, delta_rows, B_rows, C_rows, z_rows, delta_bias, delta_softplus)
            n = steps.stop - steps.start
            states = states_buffer[:n]
            chunk.states(A_t, entry_states[i], decay_buffer[:n], states)
            if i + 1 < len(chunks):
                entry_states[i + 1] = states[-1]
            y = _weighted_sum_over_states(chunk.C, states)
            if D32 is not None:
                y.addcmul_(chunk.u, D32)
            if z is not None:
                _time_major(pre_gate)[steps] = y
                y.mul_(F.silu(chunk.z))
            _time_major(out)[steps] = y
        ctx.delta_softplus, ctx.chunks = delta_softplus, chunks
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, entry_states, pre_gate)
        return out.transpose(1, 2).to(u.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias, entry_states, pre_gate = ctx.saved_tensors
        chunks = ctx.chunks
        A_t, D32 = A.float().T.contiguous(), None if D is None else D.float()
        batch, channels, length = u.shape
        grad_u, grad_delta = (u.new_empty(batch, length, channels, dtype=torch.float32) for _ in range(2))
        grad_z = None if z is None else torch.empty_like(grad_u)
        grad_B, grad_C = (u.new_empty(batch, length, A.shape[1], dtype=torch.float32) for _ in range(2))
        grad_A_t = torch.zeros_like(A_t)  # [N, Dm]
        grad_D = None if D is None else torch.zeros_like(D32)
        decay_buffer, states_buffer, grad_states_buffer = (
            entry_states.new_empty(chunks[0].stop, *entry_states.shape[1:]) for _ in range(3)
        )
        # dL/dx at a chunk's last step coming from the steps after it: decay_{t+1} * g_{t+1}.
        grad_carry = torch.zeros_like(entry_states[0])
        u_rows, delta_rows, B_rows, C_rows, z_rows, grad_out = map(_time_rows, (u, delta, B, C, z, grad_out))
        for i in range(len(chunks) - 1, -1, -1):
            steps = chunks[i]
            chunk = _Chunk(steps, u_rows, delta_rows, B_rows, C_rows, z_rows, delta_bias, ctx.delta_softplus)
            n = steps.stop - steps.start
            decay, states, grad_states = decay_buffer[:n], states_buffer[:n], grad_states_buffer[:n]
            chunk.states(A_t, entry_states[i], decay, states)
            grad_y = _load(grad_out, steps)  # [T, Bt, Dm]
            if z is not None:  # out = y * silu(z), silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
                gate = torch.sigmoid(chunk.z)
                silu_grad = (1 - gate).mul_(chunk.z).add_(1).mul_(gate)
                _time_major(grad_z)[steps] = silu_grad.mul_(grad_y).mul_(_time_major(pre_gate)[steps])
                grad_y.mul_(gate.mul_(chunk.z))
            if D32 is not None:
                grad_D += (grad_y * chunk.u).sum((0, 1))
            # grad_C_t = x_t . grad_y_t, using grad_states as scratch before it is filled.
            _time_major(grad_C)[steps] = torch.mul(states, grad_y[:, :, None, :], out=grad_states).sum(-1)
            # Adjoint recurrence: g_t = dL/dx_t = C_t * grad_y_t + decay_{t+1} * g_{t+1}.
            torch.mul(grad_y[:, :, None, :], chunk.C[..., None], out=grad_states)
            grad_states[-1] += grad_carry
            _linear_recurrence_(decay, grad_states, reverse=True)
            torch.mul(decay[0], grad_states[0], out=grad_carry)
            # dL/d(dt_t * A) = g_t * decay_t * x_{t-1}, written over decay; then states is free.
            grad_log_decay = decay.mul_(grad_states)
            grad_log_decay[0].mul_(entry_states[i])
            grad_log_decay[1:].mul_(states[:-1])
            grad_A_t += torch.mul(grad_log_decay, chunk.dt[:, :, None, :], out=states).sum((0, 1))
            grad_dt = grad_log_decay.mul_(A_t).sum(-2)  # [T, Bt, Dm]
            # x_t = decay_t * x_{t-1} + dt_t * u_t * B_t
            grad_dt_u = _weighted_sum_over_states(chunk.B, grad_states)
            _time_major(grad_B)[steps] = torch.mul(grad_states, chunk.dt_u[:, :, None, :], out=states).sum(-1)
            grad_dt.addcmul_(grad_dt_u, chunk.u)
            if ctx.delta_softplus:
                grad_dt.mul_(torch.sigmoid(chunk.delta))
            _time_major(grad_delta)[steps] = grad_dt
            grad_u_c = grad_dt_u.mul_(chunk.dt)
            _time_major(grad_u)[steps] = grad_u_c if D32 is None else grad_u_c.addcmul_(grad_y, D32)

        def cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
            """``grad`` in ``like``'s dtype, ``[Bt, L, X]`` as ``[Bt, X, L]``; None for absent inputs."""
            if grad is None or like is None:
                return None
            return (grad.transpose(1, 2) if grad.ndim == 3 else grad).to(like.dtype)

        return (
            cast(grad_u, u),
            cast(grad_delta, delta),
            cast(grad_A_t.T, A),
            cast(grad_B, B),
            cast(grad_C, C),
            cast(grad_D, D),
            cast(grad_z, z),
            cast(grad_delta.sum((0, 1)), delta_bias),
            None,
            None,
        )
