"""Sampling speed of MARS's image generation (image tokens/s): KV cache + batched CFG (what
``mmfactory generate`` does) vs no cache (every step re-runs the whole sequence) and vs two separate
forwards per step for the conditional and unconditional rows.

    .venv/bin/python benchmarks/t2i_sampling.py           # 16x16 codes, batch 8, mars/tiny's LM size
    .venv/bin/python benchmarks/t2i_sampling.py --hidden 576 --layers 30 --heads 9 --kv-heads 3 # SmolLM2

The model is a SemVIE-wrapped Qwen2 built from a config (random weights: speed does not depend on them).
Greedy sampling so that all three paths must draw the same codes, which is checked. Median of ``--repeats``
runs, interleaved. Ratios are against the no-cache path (the peer: a naive sampler).
"""

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mmfactory.mars.sampling import SamplingConfig, sample_images
from mmfactory.models.t2i import T2ILayout, TextToImageLM


def build(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, codes: int) -> TextToImageLM:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return TextToImageLM(AutoModelForCausalLM.from_config(config), T2ILayout(vocab, codes)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=16, help="image side in codes (grid^2 tokens)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=40, help="prompt length in tokens")
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.hidden, args.layers, args.heads, args.kv_heads, args.vocab, args.codes).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    uncond = prompts[0][:8]
    n = args.grid**2
    paths = {
        "cache + batched CFG": SamplingConfig(
            args.cfg_scale, temperature=0.0, use_cache=True, batched_cfg=True
        ),
        "cache + two CFG forwards": SamplingConfig(
            args.cfg_scale, temperature=0.0, use_cache=True, batched_cfg=False
        ),
        "no cache + batched CFG": SamplingConfig(
            args.cfg_scale, temperature=0.0, use_cache=False, batched_cfg=True
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    codes = {}
    for _ in range(args.repeats):
        for name, cfg in paths.items():
            sync()
            start = time.perf_counter()
            codes[name] = sample_images(model, prompts, uncond, n, cfg)
            sync()
            times[name].append(time.perf_counter() - start)
    first = next(iter(codes.values()))
    assert all(torch.equal(first, c) for c in codes.values()), "the sampling paths drew different codes"
    base = statistics.median(times["no cache + batched CFG"])
    print(
        f"{args.batch} images of {args.grid}x{args.grid} codes, prompt {args.prompt}, CFG {args.cfg_scale}, "
        f"LM hidden {args.hidden} x {args.layers} layers, {args.device}, threads {torch.get_num_threads()}"
    )
    print("| path | s per batch | image tokens/s | speed-up vs no cache |\n|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {args.batch * n / t:.0f} | {base / t:.1f}x |")


if __name__ == "__main__":
    main()
