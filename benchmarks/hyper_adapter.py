"""HyperLLaVA's experts: training-step time and memory against the static model and LoRA, and the batched
per-sample weight generation against a per-sample loop.

    .venv/bin/python benchmarks/hyper_adapter.py                                  # default sizes
    .venv/bin/python benchmarks/hyper_adapter.py --threads 1 --repeats 3 --hidden 256 --layers 4
    .venv/bin/python benchmarks/hyper_adapter.py --device cuda --hidden 1024 --layers 16 --batch 16

One MultimodalLM (a tiny CLIP-style tower, an ``mlp2x_gelu`` projector, a Qwen2 LM of ``--hidden`` x
``--layers``) is trained one step (forward, cross-entropy over every token, backward, AdamW) at equal batch
in each setting:

* LM tuned (LLaVA-1.5's stage 2): **static** (projector + LM) vs **both experts** (projector + LM +
  HyperLLaVA's visual and language experts; goal: <= 1.25x the static step);
* LM frozen: **LoRA** (peft on every attention and FFN projection, r chosen so its parameter count
  matches the experts') vs **experts** (projector + both experts).

Runs are interleaved (one of each per round, the first round dropped) and the median wall time and process
CPU time are reported. Memory is counted exactly, device-independently: the bytes autograd saves for
backward (activations, through ``saved_tensors_hooks``) and the trainable state (parameters, gradients and
AdamW's two moments); on CUDA also ``max_memory_allocated``. Last, the adapter alone: HyperAdapter's
batched matmuls vs a loop applying each sample's generated weights with ``F.linear``, forward + backward.
"""

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from mmfactory.models.components.hyper import HyperAdapter, HyperAdapterConfig
from mmfactory.models.hyperllava import HyperExpertsConfig, LanguageExpertConfig, VisualExpertConfig
from mmfactory.models.lm import CausalLMConfig
from mmfactory.models.mllm import MultimodalLMSpec, build_multimodal_lm
from mmfactory.models.vision import VisionTowerConfig

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERT = {"embed_dim": 64, "hidden_dim": 4, "rank": 16}  # hyperllava/tiny's sizes


def build(args, hyper: HyperExpertsConfig | None, trainable: tuple[str, ...], lora_r: int = 0):
    torch.manual_seed(0)
    vision = {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision |= {"image_size": 30, "patch_size": 10}
    lm = {"model_type": "qwen2", "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden}
    lm |= {"num_hidden_layers": args.layers, "num_attention_heads": 8, "num_key_value_heads": 4}
    lm |= {"max_position_embeddings": 2 * args.seq, "tie_word_embeddings": True}  # the world vocabulary
    spec = MultimodalLMSpec(
        vision=VisionTowerConfig(tiny={"model_type": "clip_vision_model", **vision}),
        lm=CausalLMConfig(tiny=lm),
        hyper=hyper,
    )
    model = build_multimodal_lm(spec)[0]
    if lora_r:
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model.language_model = get_peft_model(model.language_model, lora)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = any(part in name for part in trainable)
    return model.to(args.device)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step(model, optimizer, batch) -> tuple[float, float, int]:
    """(wall s, process CPU s, saved-for-backward bytes) of one training step."""
    input_ids, pixels = batch
    sync = torch.cuda.synchronize if input_ids.is_cuda else lambda: None
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids, pixels).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu, saved


def loop_adapter(adapter: HyperAdapter, x, guidance):
    """The peer: each sample's generated weights applied one sample at a time."""
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    gate, value, up = adapter.weights(guidance)
    return torch.stack(
        [F.linear(F.silu(F.linear(x[b], gate[b])) * F.linear(x[b], value[b]), up[b]) for b in range(len(x))]
    )


def time_adapter(fn, x, guidance, repeats: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None
    runs = []
    for _ in range(repeats + 1):
        xs, gs = x.detach().requires_grad_(), guidance.detach().requires_grad_()
        sync()
        start = time.perf_counter()
        fn(xs, gs).square().mean().backward()
        sync()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="text tokens per sample (9 image tokens more)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {where}, {args.threads} thread(s), fp32, batch {args.batch}, ")
    print(f"LM qwen2 {args.hidden} x {args.layers} layers, {args.seq} text + 9 image tokens per sample\n")

    experts = HyperExpertsConfig(VisualExpertConfig(**EXPERT), LanguageExpertConfig(**EXPERT))
    expert_params = trainable_count(build(args, experts, ("expert",)))
    lora_per_r = trainable_count(build(args, None, ("lora_",), lora_r=1))
    lora_r = max(1, round(expert_params / lora_per_r))
    lm_tuned, frozen = ("projector", "language_model"), ("projector", "expert")
    settings = {
        "static (LM tuned)": build(args, None, lm_tuned),
        "both experts (LM tuned)": build(args, experts, (*lm_tuned, "expert")),
        f"LoRA r {lora_r} (LM frozen)": build(args, None, ("projector", "lora_"), lora_r=lora_r),
        "experts (LM frozen)": build(args, experts, frozen),
    }
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in settings.items()
    }
    generator = torch.Generator().manual_seed(0)
    model = next(iter(settings.values()))
    image_id, p = model.config.image_token_id, model.config.num_image_tokens
    text = torch.randint(0, image_id, (args.batch, args.seq), generator=generator)
    images = torch.full((args.batch, p), image_id)
    input_ids = torch.cat([text[:, :1], images, text[:, 1:]], 1).to(args.device)
    pixels = torch.randn(args.batch, 3, 30, 30, generator=generator).to(args.device)

    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in settings}
    peak: dict[str, float] = {}
    for _ in range(args.repeats + 1):
        for name, m in settings.items():
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(args.device)
            runs[name].append(step(m, optimizers[name], (input_ids, pixels)))
            if args.device.startswith("cuda"):
                peak[name] = torch.cuda.max_memory_allocated(args.device) / 2**20
    columns = ["setting", "trainable", "wall ms", "CPU ms", "wall / ref", "saved activations MB"]
    columns += ["trainable state MB", *(["peak CUDA MB"] if peak else [])]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    medians = {n: [statistics.median(r[k] for r in rs[1:]) * 1e3 for k in (0, 1)] for n, rs in runs.items()}
    names = list(settings)
    for i, name in enumerate(names):
        count = trainable_count(settings[name])
        reference = names[0] if i < 2 else names[2]  # static for the LM-tuned pair, LoRA for the frozen one
        cells = [name, f"{count / 1e6:.3f} M", f"{medians[name][0]:.1f}", f"{medians[name][1]:.1f}"]
        cells.append(f"{medians[name][0] / medians[reference][0]:.2f}x")
        cells.append(f"{runs[name][-1][2] / 2**20:.1f}")
        cells.append(f"{count * 4 * 4 / 2**20:.1f}")  # fp32 weights, gradients, two AdamW moments
        cells += [f"{peak[name]:.0f}"] if peak else []
        print("| " + " | ".join(cells) + " |", flush=True)

    print("\n| adapter (fwd+bwd) | batched ms | per-sample loop ms | loop / batched |\n|---|---|---|---|")
    for batch in (args.batch, 4 * args.batch):
        torch.manual_seed(0)
        hidden = args.hidden
        adapter = HyperAdapter(hidden, hidden, hidden, HyperAdapterConfig(**EXPERT)).to(args.device)
        with torch.no_grad():
            adapter.hyper[2].weight.normal_(std=0.02)  # non-zero up rows, as after training
        x = torch.randn(batch, args.seq, hidden, device=args.device)
        guidance = torch.randn(batch, hidden, device=args.device)
        looped_adapter = partial(loop_adapter, adapter)
        torch.testing.assert_close(adapter(x, guidance), looped_adapter(x, guidance), atol=1e-5, rtol=1e-4)
        batched = time_adapter(adapter, x, guidance, args.repeats)
        looped = time_adapter(looped_adapter, x, guidance, args.repeats)
        shape = f"{batch} x {args.seq} x {hidden}"
        print(f"| {shape} | {batched:.2f} | {looped:.2f} | {looped / batched:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
