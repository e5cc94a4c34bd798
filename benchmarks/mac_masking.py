"""MAC's efficiency claim on this code: one training step with masking vs without, in the same run.

    .venv/bin/python benchmarks/mac_masking.py --threads 1       # CPU: ViT-S/16-like, 4 x 112 px, batch 8
    .venv/bin/python benchmarks/mac_masking.py --image-size 224 --device cuda   # MAC's 224 px frames, a GPU

Both sides are the real ``video_text_contrastive`` task (built as a recipe stage builds it, same weights):
MAC's masking as shipped (75% of every frame's patches dropped before the encoder, a new mask per frame;
15% of caption tokens replaced by [MASK]) against no masking. A step is forward + backward + AdamW update
on one batch of world videos. FLOPs come from ``FlopCounterMode`` over one forward + backward (matmuls and
attention); times are the median of
``--repeats`` steps, masked and unmasked interleaved so that load from other jobs hits both alike, after
one warm-up step each. Wall time and process CPU time are both reported (on a shared CPU the latter is
steadier). Paper goal: >= 60% fewer FLOPs and step time <= 0.4x ("3x faster pretraining").
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmfactory.config import StageConfig, TrainConfig
from mmfactory.eval.flops import count_flops
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext

MASKED = {
    "video_mask_ratio": 0.75,
    "video_mask_kind": "frame",
    "text_mask_ratio": 0.15,
    "text_mask_mode": "replace",
}
UNMASKED = {"video_mask_ratio": 0.0, "text_mask_ratio": 0.0}


def build(args: argparse.Namespace, options: dict, run_dir: Path):
    model = {
        "vision": {
            "image_size": args.image_size,
            "patch_size": args.patch_size,
            "num_frames": args.frames,
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "num_heads": args.hidden // 64,
        },
        "text": {
            "tiny": {
                "model_type": "bert",
                "hidden_size": args.hidden,
                "intermediate_size": 4 * args.hidden,
                "num_hidden_layers": args.text_layers,
                "num_attention_heads": args.hidden // 64,
                "max_position_embeddings": 64,
            }
        },
        "projection_dim": 256,
    }
    data = {
        "num_frames": args.frames,
        "train": [{"format": "world", "kind": "videos", "size": args.batch, "image_size": args.image_size}],
        "eval": [],
    }
    stage = StageConfig(
        name="bench",
        task="video_text_contrastive",
        model=model,
        data=data,
        options=options,
        train=TrainConfig(max_steps=1, batch_size=args.batch),
    )
    torch.manual_seed(0)
    task = build_task(stage, 0, StageContext(run_dir, run_dir / "bench")).to(args.device).train()
    dataset = task.train_dataset()
    batch = {k: v.to(args.device) for k, v in task.collate([dataset[i] for i in range(args.batch)]).items()}
    trainable = [p for p in task.parameters() if p.requires_grad]  # the temperature is fixed
    return task, batch, torch.optim.AdamW(trainable, lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None

    with tempfile.TemporaryDirectory() as tmp:
        sides = {
            name: build(args, options, Path(tmp))
            for name, options in (("masked", MASKED), ("unmasked", UNMASKED))
        }
    flops, wall, cpu = {}, {name: [] for name in sides}, {name: [] for name in sides}

    def step(name: str) -> None:
        task, batch, optimizer = sides[name]
        task(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name, (task, batch, _) in sides.items():
        flops[name] = count_flops(lambda task=task, batch=batch: task(batch)["loss"].backward())
        task.zero_grad(set_to_none=True)
        step(name)  # warm-up
    for _ in range(args.repeats):
        for name in sides:
            sync()
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            step(name)
            sync()
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)

    tokens = args.frames * (args.image_size // args.patch_size) ** 2
    print(
        f"ViT {args.hidden} x {args.layers} layers, {args.frames} frames x {args.image_size} px / patch "
        f"{args.patch_size} ({tokens} patch tokens), BERT {args.hidden} x {args.text_layers}, "
        f"batch {args.batch}, {args.device}, {torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| | GFLOPs / step (fwd+bwd) | wall ms / step | CPU ms / step |")
    print("|---|---:|---:|---:|")
    medians = {
        name: (statistics.median(wall[name]) * 1e3, statistics.median(cpu[name]) * 1e3) for name in sides
    }
    for name in sides:
        print(f"| {name} | {flops[name] / 1e9:.1f} | {medians[name][0]:.0f} | {medians[name][1]:.0f} |")
    flop_ratio = flops["masked"] / flops["unmasked"]
    wall_ratio, cpu_ratio = (medians["masked"][i] / medians["unmasked"][i] for i in (0, 1))
    print(
        f"| masked / unmasked | {flop_ratio:.3f} ({100 * (1 - flop_ratio):.0f}% fewer) "
        f"| {wall_ratio:.3f} | {cpu_ratio:.3f} |"
    )


if __name__ == "__main__":
    main()
