"""Forward + backward time of mmfactory's SparseMoeBlock against transformers' MixtralSparseMoeBlock.

    .venv/bin/python benchmarks/moe_block.py                       # default shapes, median of 7
    .venv/bin/python benchmarks/moe_block.py --threads 1 --repeats 3 --shapes 256x1024x2048
    .venv/bin/python benchmarks/moe_block.py --device cuda --shapes 1024x4096x8192 2048x8192x16384

Both blocks get the same weights (E=4 experts, top-2, SwiGLU experts of width 4H); ours holds them as
Hugging Face ``LlamaMLP`` copies (what ``upcycle`` produces), Mixtral as fused 3D tensors. Mixtral runs with
its ``eager`` experts implementation (a standalone block's default) and ``grouped_mm`` (the default inside a
model built by transformers 5.x). Outputs are checked equal first. Runs are interleaved (one of each per
round) so that load from other processes hits all sides alike. The table gives the median wall time and
the median process CPU time (less sensitive to other jobs on a shared machine) of ``forward`` + ``backward``
of ``out.square().mean()``, and the ratios Mixtral / ours (> 1 = ours faster).
"""

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import LlamaConfig, MixtralConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mmfactory.models.components.moe import SparseMoeBlock

NUM_EXPERTS, TOP_K = 4, 2
MIXTRAL_IMPLEMENTATIONS = ("eager", "grouped_mm")


def build_blocks(hidden: int, ffn: int) -> tuple[SparseMoeBlock, dict[str, MixtralSparseMoeBlock]]:
    heads = {"num_attention_heads": 4, "num_key_value_heads": 4}
    mixtral = {}
    for implementation in MIXTRAL_IMPLEMENTATIONS:
        config = MixtralConfig(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            experts_implementation=implementation,
            **heads,
        )
        torch.manual_seed(0)
        mixtral[implementation] = MixtralSparseMoeBlock(config)
        for parameter in mixtral[implementation].parameters():
            nn.init.normal_(parameter, std=0.02)
    reference = mixtral["eager"]
    experts = []
    for gate_up, down in zip(reference.experts.gate_up_proj, reference.experts.down_proj, strict=True):
        mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=ffn, **heads))
        gate, up = gate_up.detach().chunk(2, dim=0)
        mlp.gate_proj.weight.data.copy_(gate)
        mlp.up_proj.weight.data.copy_(up)
        mlp.down_proj.weight.data.copy_(down.detach())
        experts.append(mlp)
    ours = SparseMoeBlock(experts, hidden, TOP_K)
    ours.router.weight.data.copy_(reference.gate.weight)
    return ours, mixtral


def step_times(block: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(wall, process CPU) seconds of one forward + backward (a CUDA step is waited for)."""
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None
    block.zero_grad(set_to_none=True)
    inputs = x.detach().requires_grad_()
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    block(inputs).square().mean().backward()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["256x1024x512", "256x1024x2048", "512x2048x2048", "512x2048x4096"],
        help="HIDDENxFFNxTOKENS",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(
        f"torch {torch.__version__}, {where}, {args.threads} thread(s), E={NUM_EXPERTS}, top-{TOP_K}, fp32\n"
    )
    columns = ["hidden x ffn x tokens", "time", "ours ms", "Mixtral eager ms", "eager / ours"]
    columns += ["Mixtral grouped_mm ms", "grouped_mm / ours"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for shape in args.shapes:
        hidden, ffn, tokens = (int(v) for v in shape.split("x"))
        ours, mixtral = build_blocks(hidden, ffn)
        ours.to(args.device)
        for block in mixtral.values():
            block.to(args.device)
        torch.manual_seed(1)
        x = torch.randn(2, tokens // 2, hidden, device=args.device)
        with torch.no_grad():
            expected = ours(x)
            for block in mixtral.values():
                torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)
        sides = {"ours": ours, **mixtral}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for name, block in sides.items():
                times[name].append(step_times(block, x))
        for column, label in enumerate(("wall", "CPU")):
            median = {
                name: statistics.median(t[column] for t in runs[1:]) * 1e3 for name, runs in times.items()
            }
            cells = [f"{hidden} x {ffn} x {tokens}", label, f"{median['ours']:.0f}"]
            for implementation in MIXTRAL_IMPLEMENTATIONS:
                cells += [f"{median[implementation]:.0f}", f"{median[implementation] / median['ours']:.2f}x"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
