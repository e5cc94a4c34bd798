"""Filter & Align at scale: pairs/s of `mmfactory filter score` with 1 vs 2 processes and Ray Data with 1 vs 2
actors on one world pool, and the selection step on synthetic scores with DuckDB vs pandas (time and peak
memory of each, in a fresh process).

    .venv/bin/python benchmarks/filter_scoring.py --pairs 50000 --scores 10000000

Every scoring run writes its own folder and must give the same scores as the one-process run (to 1e-6),
and the two selections the same kept uids, or the script fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reward_model(folder: Path) -> Path:
    """A tiny reward model (the shape filter_align/tiny trains), saved like a stage's final/."""
    from mmfactory.config import StageConfig, TrainConfig
    from mmfactory.tasks import build_task
    from mmfactory.tasks.base import StageContext
    from tests.test_image_text_contrastive import TINY_CLIP

    stage = StageConfig(
        name="reward",
        task="image_text_reward",
        model={"tiny": TINY_CLIP, "head_hidden": 32},
        data={"train": [{"format": "world", "kind": "rankings", "size": 4}], "eval": []},
        train=TrainConfig(max_steps=1),
    )
    torch.manual_seed(0)
    task = build_task(stage, 0, StageContext(folder, folder / "reward"))
    task.save_pretrained(folder / "final")
    return folder / "final"


def scores_of(out: Path) -> dict[str, float]:
    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*/part-*.parquet"))]).to_pydict()
    return dict(zip(table["uid"], table["score"], strict=True))


def run_scoring(
    model: Path, pool: str, out: Path, processes: int, ray_workers: int, shard_size: int
) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [
        "-m",
        "mmfactory.cli",
        "filter",
        "score",
        "--model",
        str(model),
        "--pool",
        pool,
        "--out",
        str(out),
        "--shard-size",
        str(shard_size),
        "--batch-size",
        "128",
    ]
    if ray_workers:
        cmd = [sys.executable, *base, "--ray-workers", str(ray_workers)]
    elif processes > 1:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", str(processes), "--master_port", "29577", *base]
    else:
        cmd = [sys.executable, *base]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


SELECT = r"""
import json, math, resource, sys, time
from pathlib import Path
kind, scores, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
start = time.perf_counter()
if kind == "duckdb":
    sys.path.insert(0, sys.argv[4])
    from mmfactory.filter_align.select import select_top
    select_top(scores, out, keep=0.3)
else:
    import pandas as pd
    frame = pd.concat([pd.read_parquet(p) for p in sorted(scores.glob("*/part-*.parquet"))])
    frame = frame[frame.status == "ok"].sort_values(["score", "uid"], ascending=[False, True])
    out.mkdir(parents=True, exist_ok=True)
    frame.head(math.ceil(0.3 * len(frame)))[["uid", "score"]].to_parquet(out / "kept.parquet")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))
"""


def run_selection(kind: str, scores: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SELECT, kind, str(scores), str(out), str(ROOT / "src")],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--scores", type=int, default=10_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="filter-bench-"))
    model = reward_model(work / "model")
    pool = f"world:{args.pairs}:0.5"
    from mmfactory.filter_align.pool import world_pool

    start = time.perf_counter()
    world_pool(args.pairs, 0.5)  # how long rendering takes (each timed run renders the pool again)
    print(f"pool of {args.pairs} pairs rendered in {time.perf_counter() - start:.1f}s (each run renders it)")
    reference = None
    for name, processes, ray_workers in (
        ("1 process", 1, 0),
        ("2 processes (torchrun)", 2, 0),
        ("Ray, 1 actor", 1, 1),
        ("Ray, 2 actors", 1, 2),
    ):
        out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        seconds = run_scoring(model, pool, out, processes, ray_workers, args.shard_size)
        scores = scores_of(out)
        reference = reference or scores
        assert scores.keys() == reference.keys()
        assert max(abs(scores[k] - reference[k]) for k in scores) < 1e-6
        print(f"| {name} | {seconds:.1f} | {args.pairs / seconds:.0f} |", flush=True)

    rng = np.random.default_rng(0)
    synthetic = work / "synthetic"
    per_shard = 1_000_000
    for shard in range(0, args.scores, per_shard):
        n = min(per_shard, args.scores - shard)
        (synthetic / f"s{shard // per_shard:03d}").mkdir(parents=True)
        uids = pa.array([f"u{i:09d}" for i in range(shard, shard + n)])
        table = pa.table({"uid": uids, "score": rng.random(n), "status": pa.array(["ok"] * n)})
        pq.write_table(table, synthetic / f"s{shard // per_shard:03d}" / "part-00000.parquet")
    results = {kind: run_selection(kind, synthetic, work / f"kept-{kind}") for kind in ("duckdb", "pandas")}
    kept = {
        kind: pq.read_table(work / f"kept-{kind}" / "kept.parquet").column("uid").to_pylist()[:1000]
        for kind in results
    }
    assert kept["duckdb"] == kept["pandas"]
    for kind, r in results.items():
        what = f"select top 30 % of {args.scores:,} scores"
        print(f"| {what} | {kind} | {r['seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
