"""Tokens/s and model FLOPs utilisation (MFU) of one causal-LM SFT training step in bf16.

    python benchmarks/lm_step_mfu.py --device cuda                    # Qwen2.5-0.5B's shapes, seq 1024 x 8
    python benchmarks/lm_step_mfu.py --device cuda --peak-tflops 989  # name the device's dense bf16 peak
    python benchmarks/lm_step_mfu.py --dry-run                        # a tiny model on the CPU (tested)

A step is what the training loop does with ``train.precision: bf16``: fp32 weights, the forward and the
loss under bf16 autocast, backward, AdamW, zero_grad; timed after warm-up with the device synchronised.
MFU counts ``6 * params * tokens`` FLOPs per step (PaLM's estimate without the attention term
``12 * layers * hidden * seq`` per token, which at sequence 1024 would add 9 % for these shapes) against the
device's dense bf16 peak, looked up from its name or given with ``--peak-tflops``. There is no peer in the
run: compare with the same step of another trainer on the same GPU.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; sparsity not counted)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1}
QWEN25_05B = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151936}
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 512}


def device_peak(device: torch.device, given: float | None) -> float | None:
    """The dense bf16 peak in TFLOP/s: ``given``, else from the CUDA device's name, else None."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def build(shape: dict, device: torch.device) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"],
        vocab_size=shape["vocab"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device)


def measure(shape: dict, seq: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per step and the step's token count, over ``steps`` timed steps."""
    model = build(shape, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, shape["vocab"], (batch, seq), device=device)
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "tokens_per_step": batch * seq, "step_s": times[len(times) // 2]}


def report(result: dict, peak_tflops: float | None) -> dict:
    tokens_per_s = result["tokens_per_step"] / result["step_s"]
    model_tflops = 6 * result["params"] * tokens_per_s / 1e12
    mfu = model_tflops / peak_tflops if peak_tflops else None
    return {
        **result,
        "tokens_per_s": tokens_per_s,
        "model_tflops": model_tflops,
        "peak_tflops": peak_tflops,
        "mfu": mfu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, 2 steps of 2 x 64 (CPU check)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    shape, seq, batch, steps, warmup = QWEN25_05B, args.seq, args.batch, args.steps, args.warmup
    if args.dry_run:
        shape, seq, batch, steps, warmup = TINY, 64, 2, 2, 1
    device = torch.device(args.device)
    result = report(measure(shape, seq, batch, steps, warmup, device), device_peak(device, args.peak_tflops))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mfu = f"{100 * result['mfu']:.1f} %" if result["mfu"] is not None else "n/a (no peak for this device)"
    print(f"device {name}; {result['params'] / 1e6:.1f} M params; {batch} x {seq} tokens per step")
    print(
        f"step {result['step_s'] * 1e3:.1f} ms (median of {steps}); {result['tokens_per_s']:.0f} tokens/s; "
        f"{result['model_tflops']:.2f} model TFLOP/s (6 x params x tokens); MFU {mfu}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({**result, "device": name}, indent=1))


if __name__ == "__main__":
    main()
