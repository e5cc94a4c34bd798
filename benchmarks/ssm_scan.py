"""Speed of the Mamba mixer and selective scan, forward + backward, against peers measured in the same run.

    python benchmarks/ssm_scan.py                        # ARM sizes: d 192, N 16, expand 1, L 144 and 576
    python benchmarks/ssm_scan.py --lengths 144 --repeats 9 --threads 2
    python benchmarks/ssm_scan.py --device cuda --lengths 196 576 2304

Rows:
- ``MambaMixer`` vs ``transformers.models.mamba.modeling_mamba.MambaMixer`` (same weights and input): on CUDA
  with mamba-ssm and causal-conv1d installed it runs their fused kernels (the row says so), else
  transformers' sequential torch fallback;
- ``selective_scan`` vs ``selective_scan_ref`` (our step-by-step reference under autograd);
- ``selective_scan`` vs a log-space chunked scan under autograd (``cumsum(delta * A)`` inside chunks of 32,
  the usual pure-PyTorch Mamba-1 recipe; it can overflow, see ``ssm/scan.py``), to justify the design.

Times are medians of ``--repeats`` runs (``--peer-repeats`` for the slow transformers peer) after one
warm-up. ``--threads`` defaults to 1: on a small shared machine, two OpenMP threads mostly wait on each
other and the timings become noise.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer
from transformers.utils import logging as hf_logging
from transformers.utils.import_utils import is_causal_conv1d_available, is_mamba_ssm_available

from mmfactory.models.components.ssm import MambaMixer, selective_scan, selective_scan_ref


def logspace_chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, chunk_size=32) -> Tensor:
    """Peer: chunked scan with ``x_t = exp(S_t) * (x_0 + cumsum_s(exp(-S_s) * delta_s B_s u_s))``,
    ``S = cumsum(delta * A)`` inside each chunk, differentiated by autograd. Shapes as selective_scan."""
    dt = delta + delta_bias[:, None]
    dt = (F.softplus(dt) if delta_softplus else dt).transpose(1, 2)  # [Bt, L, Dm]
    log_decay = dt[..., None] * A  # [Bt, L, Dm, N]
    inputs = (dt * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]
    state, ys = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
    for start in range(0, u.shape[-1], chunk_size):
        steps = slice(start, start + chunk_size)
        cum_log_decay = log_decay[:, steps].cumsum(1)
        states = torch.exp(cum_log_decay) * (
            state[:, None] + (inputs[:, steps] * torch.exp(-cum_log_decay)).cumsum(1)
        )
        state = states[:, -1]
        ys.append((states * C.transpose(1, 2)[:, steps, None, :]).sum(-1))
    y = torch.cat(ys, 1).transpose(1, 2) + D[:, None] * u
    return y * F.silu(z)


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    """Median wall seconds of ``step`` after one warm-up; CUDA work is waited for."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else lambda: None
    step()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(fn: Callable[..., Tensor], **inputs) -> Callable[[], None]:
    """One step: ``fn(**inputs)``, then backward of its sum into every input that requires grad."""
    return lambda: fn(**inputs).sum().backward()


def print_row(what: str, length: int, ours: float, peer: float) -> None:
    print(f"| {what} | {length} | {ours:.4f} | {peer:.4f} | {peer / ours:.1f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[144, 576])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--expand", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--peer-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # its "falling back to the torch implementation" notices

    torch.manual_seed(0)
    config = MambaConfig(
        hidden_size=args.d_model,
        state_size=args.d_state,
        expand=args.expand,
        conv_kernel=4,
        num_hidden_layers=1,
    )
    peer = HFMambaMixer(config, layer_idx=0)
    ours = MambaMixer(args.d_model, d_state=args.d_state, d_conv=4, expand=args.expand)
    ours.load_state_dict(peer.state_dict())
    peer.to(args.device), ours.to(args.device)
    device = torch.device(args.device)
    inner = args.expand * args.d_model

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    kernels = is_mamba_ssm_available() and is_causal_conv1d_available() and device.type == "cuda"
    peer_path = "mamba-ssm kernels" if kernels else "torch fallback"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} thread(s), batch {args.batch},")
    print(f"d {args.d_model}, N {args.d_state}, expand {args.expand}; median seconds of forward + backward\n")
    print("| ours vs peer | L | ours (s) | peer (s) | speed-up |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.d_model, device=device, requires_grad=True)
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-4, atol=1e-5)
        ours_s = median_seconds(forward_backward(ours, hidden_states=x), args.repeats)
        peer_s = median_seconds(forward_backward(peer, hidden_states=x), args.peer_repeats)
        print_row(f"MambaMixer vs transformers MambaMixer ({peer_path})", length, ours_s, peer_s)

        scan_inputs = {
            "u": torch.randn(args.batch, inner, length, device=device),
            "delta": torch.randn(args.batch, inner, length, device=device) * 0.5 - 3,
            "A": -torch.exp(ours.A_log.detach()),
            "B": torch.randn(args.batch, args.d_state, length, device=device),
            "C": torch.randn(args.batch, args.d_state, length, device=device),
            "D": torch.ones(inner, device=device),
            "z": torch.randn(args.batch, inner, length, device=device),
            "delta_bias": ours.dt_proj.bias.detach().clone(),
            "delta_softplus": True,
        }
        for tensor in scan_inputs.values():
            if isinstance(tensor, Tensor):
                tensor.requires_grad_()
        scan_s = median_seconds(forward_backward(selective_scan, **scan_inputs), args.repeats)
        for name, fn in (
            ("selective_scan_ref", selective_scan_ref),
            ("log-space chunked", logspace_chunked_scan),
        ):
            torch.testing.assert_close(fn(**scan_inputs), selective_scan(**scan_inputs), rtol=1e-4, atol=1e-4)
            peer_s = median_seconds(forward_backward(fn, **scan_inputs), args.repeats)
            print_row(f"selective_scan vs {name}", length, scan_s, peer_s)


if __name__ == "__main__":
    main()
