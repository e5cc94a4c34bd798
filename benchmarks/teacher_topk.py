"""LLaVA-MoD mimic distillation: the online teacher against its top-k log-probs stored on disk, same run.

    .venv/bin/python benchmarks/teacher_topk.py --threads 1                       # teacher 4x the student
    .venv/bin/python benchmarks/teacher_topk.py --threads 1 --teacher-hidden 384 --teacher-layers 6

Both sides are the real ``mllm_mimic_distill`` task (built as a recipe stage builds it, same student weights,
same world batches): ``options.teacher_topk: null`` runs the frozen teacher in every step; ``teacher_topk: K``
computes the teacher's top-K once (timed: the cache cost), writes safetensors shards and trains from them
without the teacher in memory. A step is forward + backward + AdamW on one batch; times are the median of
``--repeats`` steps, the two sides interleaved so load from other jobs hits both alike, after a warm-up step
each. Memory: the teacher's weights (held only by the online side) and the cache's size on disk.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from mmfactory.config import StageConfig, TrainConfig
from mmfactory.models.lm import CausalLMConfig
from mmfactory.models.mllm import MultimodalLMSpec, build_multimodal_lm
from mmfactory.models.vision import VisionTowerConfig
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext

TOWER = {
    "model_type": "clip_vision_model",
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 30,
    "patch_size": 10,
}


def lm(hidden: int, layers: int) -> dict:
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }


def save_teacher(args: argparse.Namespace, folder: Path) -> int:
    """A random teacher (speed does not depend on its training); returns its parameter bytes."""
    spec = MultimodalLMSpec(
        vision=VisionTowerConfig(tiny=TOWER),
        lm=CausalLMConfig(tiny=lm(args.teacher_hidden, args.teacher_layers)),
    )
    model, tokenizer, image_processor = build_multimodal_lm(spec)
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build(args: argparse.Namespace, teacher: Path, run_dir: Path, topk: int | None):
    stage = StageConfig(
        name="mimic",
        task="mllm_mimic_distill",
        model={"vision": {"tiny": TOWER}, "lm": {"tiny": lm(args.student_hidden, args.student_layers)}},
        data={
            "train": [
                {"format": "world", "kind": kind, "size": args.samples}
                for kind in ("llava", "vqa", "captions")
            ],
            "eval": [],
        },
        options={
            "teacher": str(teacher),
            "mode": "kd_lm",
            "upcycle": {"num_experts": 4, "top_k": 2},
            "teacher_topk": topk,
            "eval": {"vqa": 0, "pope": 0, "captions": 0},
        },
        trainable=["model.projector.*", "model.language_model.*"],
        train=TrainConfig(batch_size=args.batch_size, max_steps=args.repeats + 1),
    )
    torch.manual_seed(0)
    return build_task(stage, 0, StageContext(run_dir, run_dir / "mimic"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher-hidden", type=int, default=192)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--samples", type=int, default=512, help="world images per kind (x3 kinds)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_bytes = save_teacher(args, tmp / "teacher")
        online = build(args, tmp / "teacher", tmp / "online", None)
        stored = build(args, tmp / "teacher", tmp / "stored", args.k)
        start = time.perf_counter()
        stored.prepare(Accelerator(cpu=True))  # writes the cache (the stage's prepare step)
        stored_data = stored.train_dataset()
        cache_s = time.perf_counter() - start
        cache_bytes = sum(f.stat().st_size for f in (tmp / "stored/mimic/teacher_topk").iterdir())
        online_data = online.train_dataset()
        sides = {
            "online teacher": (online, online_data),
            f"stored top-{args.k}": (stored, stored_data),
        }
        optimizers = {
            name: torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
            for name, (task, _) in sides.items()
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        generator = torch.Generator().manual_seed(0)
        for step in range(args.repeats + 1):
            indices = torch.randint(len(online_data), (args.batch_size,), generator=generator).tolist()
            for name, (task, data) in sides.items():
                batch = task.collate([data[i] for i in indices])
                start = time.perf_counter()
                optimizers[name].zero_grad()
                task(batch)["loss"].backward()
                optimizers[name].step()
                if step:  # the first step of each side is a warm-up
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}

    student_params = sum(p.numel() for p in stored.model.parameters())
    print(
        f"teacher {teacher_bytes / 4 / 1e6:.2f}M params ({teacher_bytes / 2**20:.1f} MiB), "
        f"student {student_params / 1e6:.2f}M (MoE, total), {len(online_data)} samples, "
        f"batch {args.batch_size}"
    )
    print(f"{'side':<16} {'step ms':>8} {'teacher in memory':>18}")
    print(
        f"{'online teacher':<16} {1000 * medians['online teacher']:>8.1f} {teacher_bytes / 2**20:>14.1f} MiB"
    )
    name = f"stored top-{args.k}"
    print(f"{name:<16} {1000 * medians[name]:>8.1f} {0:>14.1f} MiB")
    print(
        f"step time stored / online: {medians[name] / medians['online teacher']:.2f}x; "
        f"cache: {cache_s:.1f} s to write once, {cache_bytes / 2**20:.1f} MiB on disk"
    )


if __name__ == "__main__":
    main()
