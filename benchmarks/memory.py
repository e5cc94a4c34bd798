"""Memory: peak memory and step time of a ~100M-parameter LM SFT stage with and without
``train.gradient_checkpointing``, or (``--fsdp``) on one process and sharded over two with FSDP2, same run
(issue 14).

    .venv/bin/python benchmarks/memory.py --threads 1                          # 104M params, 4 x 512 tokens
    .venv/bin/python benchmarks/memory.py --threads 1 --hidden 256 --layers 4 --steps 3   # a quick look
    .venv/bin/python benchmarks/memory.py --device cuda --batch 8 --seq-len 2048
    .venv/bin/python benchmarks/memory.py --threads 1 --fsdp    # 1 process vs FSDP2 on 2 (gloo on the CPU)

Each setting is a whole ``causal_lm_sft`` stage run by the real runner and training loop (what ``mmfactory
run`` does) in a subprocess of its own: a Qwen2 from ``tiny`` (``--hidden`` x ``--layers``, FFN
``--ffn-mult`` x hidden, the world tokenizer's vocabulary, untied embeddings) on world chats, every batch
padded to ``--seq-len`` tokens (``data.pad_to_multiple_of``: padding costs the compute and the activation
memory of real tokens), AdamW, fp32, no evaluation or generation. The peer is the same stage without
checkpointing; ``--attn`` picks ``model.attn_implementation`` for both. With ``--fsdp`` the peer is the
stage on one process and the other setting the same stage launched with configs/accelerate/fsdp.yaml on 2
processes, each with the same micro-batch (so the per-process activations are alike and the shards of
weights, gradients and AdamW state make the difference); the main process reports (the loop logs there;
every process holds an equal shard). There, memory is the peak RSS *during training* (``VmHWM`` at the
last step's log), which leaves out the unsharded copy FSDP gathers afterwards to evaluate and save. The
last column counts the tensor storages alive after the last step (weights and AdamW moments; a sharded
parameter counts its shard), which the CPU allocator's caching does not blur.

Memory, per subprocess: on the CPU its peak resident set size (``getrusage``'s ``ru_maxrss``; each child
reads its own, ``RUSAGE_SELF`` at exit, because the parent's ``RUSAGE_CHILDREN`` is the maximum over every
child it has waited for) and its RSS when training starts (model built, optimizer state not yet allocated),
so the difference is what training adds: gradients, AdamW's moments and the activations; on CUDA
``torch.cuda.max_memory_allocated``. Step time: the median interval between the loop's per-step logs
(``log_every: 1``), the first step (AdamW's state allocation) left out.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def recipe(args: argparse.Namespace, checkpointing: bool) -> dict:
    lm = {"model_type": "qwen2", "hidden_size": args.hidden, "intermediate_size": ffn_size(args)}
    lm |= {"num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64}
    lm |= {"num_key_value_heads": args.hidden // 64, "max_position_embeddings": args.seq_len}
    lm |= {"tie_word_embeddings": False, "attention_dropout": 0.0}
    samples = args.batch * (args.steps + 1)
    return {
        "name": "bench/memory",
        "stages": [
            {
                "name": "sft",
                "task": "causal_lm_sft",
                "model": {"tiny": lm, "attn_implementation": args.attn},
                "data": {
                    "train": [{"format": "world", "kind": "chat", "size": samples}],
                    "eval": [],
                    "max_length": args.seq_len,
                    "pad_to_multiple_of": args.seq_len,
                },
                "options": {"eval": {"generate": 0}},
                "optimizer": {"lr": 1.0e-4},
                "schedule": {"kind": "constant", "warmup_steps": 0},
                "train": {
                    "batch_size": args.batch,
                    "max_steps": args.steps,
                    "log_every": 1,
                    "seed": 0,
                    "shuffle": False,
                    "gradient_checkpointing": checkpointing,
                    "report_to": ["jsonl"],
                },
            }
        ],
    }


def ffn_size(args: argparse.Namespace) -> int:
    return round(args.ffn_mult * args.hidden)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """This process's resident set size now (Linux)."""
    return _status_mib("VmRSS")


def live_tensor_mib() -> float:
    """Bytes of every tensor storage alive in this process (each storage once; a sharded parameter counts
    its local shard), in MiB: what the process holds, whatever the allocator keeps on top."""
    import gc

    import torch
    from torch.distributed.tensor import DTensor

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            local = obj.to_local() if isinstance(obj, DTensor) else obj
            storage = local.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux)."""
    return _status_mib("VmHWM")


def child(args: argparse.Namespace) -> None:
    """One setting's stage; prints its measurements as one JSON line."""
    import torch
    from accelerate.tracking import GeneralTracker

    from mmfactory.config import recipe_from_dict
    from mmfactory.runner import run_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()

    class StepClock(GeneralTracker):
        """Notes the time of every step's log and the RSS when training starts."""

        name, requires_logging_directory = "step_clock", False

        def __init__(self):
            super().__init__()
            self.times: list[float] = []
            self.start_rss = self.start_cuda = self.train_peak = self.live = float("nan")

        @property
        def tracker(self):
            return self.times

        def start(self):
            self.start_rss = rss_mib()
            self.start_cuda = torch.cuda.memory_allocated() / 2**20 if cuda else float("nan")

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            if "loss" in values:
                self.times.append(time.perf_counter())
                self.train_peak = peak_rss_mib()
                self.live = live_tensor_mib()  # between steps: weights, AdamW moments (gradients freed)

        def finish(self):
            pass

    clock = StepClock()
    results = run_recipe(recipe_from_dict(recipe(args, args.checkpointing)), Path(args.out), trackers=[clock])
    intervals = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    if not clock.times:  # a process other than the main one: the loop logs on the main process only
        return
    metrics = results["metrics"]
    report = {
        "params_m": metrics["sft/trainable_params_m"],
        "step_s": statistics.median(intervals),
        "steps_timed": len(intervals),
        "rss_peak_mib": (
            clock.train_peak if args.fsdp else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        "rss_start_mib": clock.start_rss,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
        "cuda_start_mib": clock.start_cuda,
        "loss": metrics["sft/train_loss"],
        "live_mib": clock.live,
    }
    print("RESULT " + json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn-mult", type=float, default=10 / 3, help="FFN width / hidden (2560 at 768)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps; the first is not timed")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fsdp", action="store_true", help="1 process vs FSDP2 on 2 (no checkpointing)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)  # the run folder every process of a setting shares
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first step is not timed)")
    if args.child:
        child(args)
        return

    import torch

    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    rows = {}
    for name, cmd in settings(args).items():
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([*cmd, "--out", out], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{name}: the stage failed\n{proc.stderr[-3000:]}")
        reports = [
            json.loads(x[len("RESULT ") :]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")
        ]
        rows[name] = max(reports, key=lambda r: r["rss_peak_mib"])  # the process that needed the most

    peer = rows[next(iter(rows))]
    print(
        f"torch {torch.__version__}, {args.device}, {args.threads or torch.get_num_threads()} thread(s), "
        "fp32, "
        f"qwen2 {args.hidden} x {args.layers} layers (FFN {ffn_size(args)}), "
        f"{peer['params_m']:.1f}M params, batch {args.batch} x {args.seq_len} tokens, AdamW, "
        f"attn {args.attn}, {peer['steps_timed']} timed steps\n"
    )
    kind = "cuda" if args.device == "cuda" else "rss"
    memory = "CUDA peak MiB" if kind == "cuda" else "peak RSS MiB"
    print(
        f"| setting | step s | step / peer | {memory} | at start MiB | training adds MiB | adds / peer "
        "| live tensors between steps MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    peak_key, start_key = f"{kind}_peak_mib", f"{kind}_start_mib"
    peer_adds = peer[peak_key] - peer[start_key]
    for name, row in rows.items():
        adds = row[peak_key] - row[start_key]
        print(
            f"| {name} | {row['step_s']:.2f} | {row['step_s'] / peer['step_s']:.2f}x | {row[peak_key]:.0f} | "
            f"{row[start_key]:.0f} | {adds:.0f} | {adds / peer_adds:.2f}x | {row['live_mib']:.0f} |"
        )
    other = rows[list(rows)[1]]
    print(
        f"\npeak memory {other[peak_key] / peer[peak_key]:.2f}x the peer's, step time "
        f"{other['step_s'] / peer['step_s']:.2f}x; final train loss {other['loss']:.6f} vs {peer['loss']:.6f}"
    )


def settings(args: argparse.Namespace) -> dict[str, list[str]]:
    """The command of each setting, the peer first."""
    child = [__file__, "--child", *sys.argv[1:]]
    if not args.fsdp:
        return {
            "no checkpointing (peer)": [sys.executable, *child],
            "gradient checkpointing": [sys.executable, *child, "--checkpointing"],
        }
    config = Path(__file__).resolve().parents[1] / "configs/accelerate/fsdp.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return {
        "1 process (peer)": [sys.executable, *child],
        "FSDP2, 2 processes": [*launch, "--num_processes", "2", "--main_process_port", "29571", *child],
    }


if __name__ == "__main__":
    main()
