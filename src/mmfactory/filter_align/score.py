"""Score a pool of image-text pairs with a reward model (or the CLIP cosine), resumable and sharded.

Output, under ``out/``: for each pool shard a folder ``{shard}/`` of ``part-NNNNN.parquet`` files (columns
``uid``, ``score`` float64, ``status``: ``ok`` or the bad-sample reason, whose score is null), each written
atomically after ``chunk`` pairs, and, once the shard is finished, ``{shard}/DONE.json`` with its counts.

* **Resume.** A rerun skips finished shards and, in an unfinished one, the pairs its parts already hold
  (the shard's item order is fixed), so a job killed at any moment — also mid-shard — ends with every pair
  scored exactly once.
* **Processes.** Under ``torchrun`` / ``accelerate launch`` process ``r`` of ``W`` takes shards
  ``r, r + W, ...``; the processes never talk to each other, so any number of jobs on any machines can
  share one pool and one output folder.
* **A cluster.** :func:`score_pool_ray` runs the same shards through Ray Data: ``from_items`` over the
  shard list, ``map_batches`` with :class:`ShardScorer` (a stateful actor class that loads the model once),
  ``concurrency`` actors of ``num_cpus`` / ``num_gpus`` each, writing the same layout (so resuming and
  selection do not care which engine scored a shard).
* **Bad items** (an image that does not decode, a missing member, an empty caption) are rows with their
  reason and no score: counted per reason in ``DONE.json``, never dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mmfactory.atomic import write_atomic
from mmfactory.filter_align.pool import Shard, decode_item, pool_shards, shard_items
from mmfactory.models.image_text_scorer import tokenize_texts

SCHEMA = pa.schema([("uid", pa.string()), ("score", pa.float64()), ("status", pa.string())])


SCORERS = ("reward", "cosine", "random")


def make_scorer(model: str | Path | None, scorer: str = "reward", seed: int = 0):
    """The scorer a job uses (:class:`PairScorer` or, for ``random``, :class:`RandomScorer`)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer: {scorer!r}; expected one of {SCORERS}")
    if scorer == "random":
        return RandomScorer(seed)
    if model is None:
        raise ValueError(f"scorer {scorer!r} needs a model folder")
    return PairScorer(model, scorer)


class RandomScorer:
    """The random-subset baseline: a pair's score is a uniform draw in [0, 1) fixed by ``(seed, uid)`` (a
    SHA-256 of both), so every process, engine and rerun gives a pair the same score."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, images: list[np.ndarray], texts: list[str], uids: list[str]) -> np.ndarray:
        digests = [hashlib.sha256(f"{self.seed}\0{uid}".encode()).digest() for uid in uids]
        return np.array([int.from_bytes(d[:8], "big") / 2.0**64 for d in digests], dtype=np.float64)


class PairScorer:
    """Scores ``(images, texts)`` batches: the model's head ``r(i, t)`` (``scorer="reward"``: a reward
    model, or an image-text matching model's match logit) or the cosine of its (or a plain CLIP folder's)
    embeddings (``scorer="cosine"``, CLIP-score filtering)."""

    def __init__(self, folder: str | Path, scorer: str = "reward", device: str | None = None):
        from mmfactory.models.clip import CLIPSpec, load_clip
        from mmfactory.models.image_text_scorer import HEAD_CONFIG, ImageTextScorer, load_scorer

        folder = Path(folder)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if (folder / HEAD_CONFIG).is_file():
            self.model, self.tokenizer, self.image_processor = load_scorer(folder)
        elif scorer == "reward":
            raise FileNotFoundError(f"{folder}: no scorer head ({HEAD_CONFIG}); score with --scorer cosine")
        else:
            clip, self.tokenizer, self.image_processor = load_clip(CLIPSpec(), folder)
            self.model = ImageTextScorer(clip, None)
        self.model.to(self.device).eval()
        self.scorer = scorer
        self.max_length = self.model.max_text_length

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], texts: list[str], uids: list[str]) -> np.ndarray:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        tokens = tokenize_texts(self.model, self.tokenizer, texts, self.max_length)
        image = self.model.embed_images(pixels)
        text = self.model.embed_texts(
            tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        )
        if self.scorer == "cosine":
            scores = (image.embedding * text.embedding).sum(-1)
        else:
            scores = self.model.head(image, text)
        return scores.double().cpu().numpy()


def _write_part(folder: Path, index: int, rows: dict[str, list]) -> None:
    path = folder / f"part-{index:05d}.parquet"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    pq.write_table(pa.table(rows, schema=SCHEMA), tmp)
    tmp.replace(path)


def _batches(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_shard(scorer, shard: Shard, out: Path, batch_size: int, chunk: int, bar) -> dict:
    """Score one shard into ``out/{shard}/`` from where an earlier run left it; returns its counts."""
    folder = out / shard.name
    if (folder / "DONE.json").is_file():
        return json.loads((folder / "DONE.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    parts = sorted(folder.glob("part-*.parquet"))
    done = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    items = shard_items(shard)
    for _ in range(done):  # already scored by an earlier run
        next(items)
    rows: dict[str, list] = {"uid": [], "score": [], "status": []}
    part = len(parts)
    for batch in _batches(items, batch_size):
        decoded = [decode_item(item) for item in batch]
        good = [i for i, (_, status) in enumerate(decoded) if status == "ok"]
        images, texts = [decoded[i][0] for i in good], [batch[i]["text"] for i in good]
        scores = scorer(images, texts, [str(batch[i]["uid"]) for i in good]) if good else []
        by_index = dict(zip(good, scores, strict=True))
        for i, item in enumerate(batch):
            rows["uid"].append(str(item["uid"]))
            rows["score"].append(float(by_index[i]) if i in by_index else None)
            rows["status"].append(decoded[i][1])
        bar.update(len(batch))
        if len(rows["uid"]) >= chunk:
            _write_part(folder, part, rows)
            part, rows = part + 1, {"uid": [], "score": [], "status": []}
    if rows["uid"]:
        _write_part(folder, part, rows)
    statuses = Counter()
    for path in sorted(folder.glob("part-*.parquet")):
        statuses.update(pq.read_table(path, columns=["status"]).column("status").to_pylist())
    summary = {
        "shard": shard.name,
        "pairs": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
    }
    write_atomic(folder / "DONE.json", json.dumps(summary, indent=1))
    return summary


def score_pool(
    model: str | Path | None,
    pool: str,
    out: str | Path,
    scorer: str = "reward",
    batch_size: int = 64,
    chunk: int = 1024,
    shard_size: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Score this process's shards of ``pool`` into ``out`` (module docstring); returns the counts of the
    shards it scored and the time it took. ``seed``: the random scorer's."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    out = Path(out)
    shards = pool_shards(pool, shard_size)[rank::world_size]
    pair_scorer = make_scorer(model, scorer, seed)
    start = time.perf_counter()
    summaries = []
    with tqdm(desc=f"scoring (process {rank})", unit="pairs", disable=rank != 0, dynamic_ncols=True) as bar:
        for shard in shards:
            summaries.append(score_shard(pair_scorer, shard, out, batch_size, chunk, bar))
    seconds = time.perf_counter() - start
    statuses = Counter()
    for summary in summaries:
        statuses.update(summary["statuses"])
    pairs = sum(statuses.values())
    return {"shards": len(shards), "pairs": pairs, "statuses": dict(statuses), "seconds": round(seconds, 3)}


class _NoBar:
    def update(self, n: int) -> None:
        pass


class ShardScorer:
    """Ray Data actor: loads the scorer once, then scores each shard of its batches into ``out``."""

    def __init__(
        self, model: str | None, out: str, scorer: str, batch_size: int, chunk: int, threads: int, seed: int
    ):
        torch.set_num_threads(threads)
        self.scorer, self.out = make_scorer(model, scorer, seed), Path(out)
        self.batch_size, self.chunk = batch_size, chunk

    def __call__(self, batch: dict) -> dict:
        summaries = [
            score_shard(
                self.scorer, Shard(str(name), str(spec)), self.out, self.batch_size, self.chunk, _NoBar()
            )
            for name, spec in zip(batch["name"], batch["spec"], strict=True)
        ]
        return {
            "shard": [s["shard"] for s in summaries],
            "statuses": [json.dumps(s["statuses"]) for s in summaries],
        }


def score_pool_ray(
    model: str | Path | None,
    pool: str,
    out: str | Path,
    scorer: str = "reward",
    batch_size: int = 64,
    chunk: int = 1024,
    shard_size: int = 1000,
    workers: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    seed: int = 0,
) -> dict:
    """Score ``pool`` into ``out`` with ``workers`` Ray actors (module docstring). Ray must be started
    (``ray.init()``, or ``RAY_ADDRESS`` for a cluster); otherwise it starts a local one."""
    import ray

    if not ray.is_initialized():
        ray.init()
    shards = pool_shards(pool, shard_size)
    items = ray.data.from_items([{"name": s.name, "spec": s.spec} for s in shards])
    start = time.perf_counter()
    results = items.map_batches(
        ShardScorer,
        fn_constructor_kwargs={
            "model": None if model is None else str(model),
            "out": str(out),
            "scorer": scorer,
            "batch_size": batch_size,
            "chunk": chunk,
            "threads": max(1, int(num_cpus)),
            "seed": seed,
        },
        batch_size=1,
        concurrency=workers,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    ).take_all()
    statuses = Counter()
    for row in results:
        statuses.update(json.loads(row["statuses"]))
    seconds = time.perf_counter() - start
    return {
        "shards": len(results),
        "pairs": sum(statuses.values()),
        "statuses": dict(statuses),
        "seconds": round(seconds, 3),
    }
