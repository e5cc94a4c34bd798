"""Filter & Align's curation step as a stage, the ``pool_filter`` task: score a pool of image-text pairs
with an earlier stage's model and keep its top fraction, so later stages can train on the selection
(``{format: world, kind: web_pool, keep_uids: THIS_STAGE}``; the selection at a ``report_keeps`` fraction
``f``: ``keep_uids: THIS_STAGE/keep-f``, e.g. ``filter_reward/keep-0.15``). It trains nothing.

The scoring is :func:`~mmfactory.filter_align.score.score_pool` into ``scores/`` of the stage folder
(resumable; under several processes each scores its own shards) and the selection
:func:`~mmfactory.filter_align.select.select_top`; ``final/`` holds the selection (``kept_uids.txt``,
``kept.parquet``, ``selection.json``) and, in ``keep-{f}/``, the selection at each ``report_keeps``
fraction. Scorers: ``reward`` (the ``init_from`` model's head: a reward model, or an image-text matching
model's match logit, BLIP-score), ``cosine`` (CLIP score of the ``init_from`` model's embeddings) and
``random`` (no model).

On the world's pool (``world:N[:BAD]``) the hidden truth measures the filter as a detector of misaligned
pairs, at ``keep`` and at every ``report_keeps`` fraction ``f`` (metric prefix ``keep{100 f}_``): of the pairs
it drops, the share that are misaligned (``drop_precision``) and of the misaligned pairs, the share it drops
(``drop_recall``), in percent, and the share of each caption kind it keeps (``kept_{kind}``).
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb

from mmfactory.config import ConfigError
from mmfactory.examples import Example, write_examples
from mmfactory.filter_align.pool import world_pool
from mmfactory.filter_align.score import score_pool
from mmfactory.filter_align.select import select_top
from mmfactory.tasks.base import TrainingTask

SELECTION_FILES = ("kept_uids.txt", "kept.parquet", "selection.json")


@dataclass
class PoolFilterModel:
    """The scoring model is the stage's ``init_from`` (none for the random scorer)."""


@dataclass
class PoolFilterData:
    pool: str = "world:4000:0.5"  # a pool spec (mmfactory.filter_align.pool): world:N[:BAD] or shards
    shard_size: int = 1000  # pairs per shard of a world pool

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")


@dataclass
class PoolFilterOptions:
    scorer: Literal["reward", "cosine", "random"] = "reward"
    keep: float = 0.3  # the fraction kept in final/ (DataComp's --fraction)
    report_keeps: list[float] = field(default_factory=lambda: [0.15, 0.5])  # also measured at these
    batch_size: int = 64
    seed: int = 0  # the random scorer's

    def validate(self) -> None:
        for value in (self.keep, *self.report_keeps):
            if not 0 < value <= 1:
                raise ConfigError(f"keep / report_keeps: fractions in (0, 1], got {value}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


class PoolFilterTask(TrainingTask):
    model_config = PoolFilterModel
    data_config = PoolFilterData
    options_config = PoolFilterOptions
    trains = False

    def __init__(self, stage, ctx, model_cfg, data_cfg: PoolFilterData, options: PoolFilterOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.model_dir = ctx.resolve_init(stage.init_from)
        if self.model_dir is None and options.scorer != "random":
            raise ConfigError(f"{stage.name}: the {options.scorer} scorer needs init_from (a model stage)")
        self.scores, self.selections = ctx.stage_dir / "scores", ctx.stage_dir / "selections"

    def run(self, accelerator) -> dict[str, float]:
        o, d = self.options, self.data_cfg
        scored = score_pool(
            self.model_dir,
            d.pool,
            self.scores,
            o.scorer,
            o.batch_size,
            shard_size=d.shard_size,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=o.seed,
        )
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return {}
        metrics: dict[str, float] = {f"pool_{k}": v for k, v in Counter(scored["statuses"]).items()}
        truth = {p["uid"]: p for p in world_pool(*self.world_pool_spec())} if self.is_world else None
        for fraction in dict.fromkeys([o.keep, *o.report_keeps]):
            summary = select_top(self.scores, self.selection_dir(fraction), keep=fraction)
            if fraction == o.keep:
                metrics.update(kept=summary["kept"], scored=summary["scored"], threshold=summary["threshold"])
            if truth is not None:
                metrics.update(self.detection(fraction, truth))
        if truth is not None:
            write_examples(self.ctx.stage_dir, "Kept and rejected pool pairs", self.extremes(truth))
        return metrics

    def extremes(self, truth: dict[str, dict], n: int = 4) -> list[Example]:
        """The ``n`` best- and ``n`` worst-scored pairs with the world's truth: right when a kept pair is
        aligned or a rejected one is not."""
        scores = str(self.scores / "*" / "*.parquet").replace("'", "''")
        db, shown = duckdb.connect(), []
        for verdict, order in (("kept", "DESC"), ("rejected", "ASC")):
            query = (
                f"SELECT uid, score FROM '{scores}' WHERE status = 'ok' ORDER BY score {order}, uid LIMIT {n}"
            )
            for uid, score in db.execute(query).fetchall():
                pair = truth[uid]
                fields = {"caption": pair["text"], "score": f"{score:.3f}", "truth": pair["kind"]}
                shown.append(
                    Example(verdict, fields, [pair["image"]], correct=pair["aligned"] == (verdict == "kept"))
                )
        return shown

    @property
    def is_world(self) -> bool:
        return self.data_cfg.pool.startswith("world:")

    def world_pool_spec(self) -> tuple[int, float]:
        parts = self.data_cfg.pool.split(":")
        return int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.5

    def selection_dir(self, fraction: float) -> Path:
        return self.selections / f"keep-{fraction:g}"

    def detection(self, fraction: float, truth: dict[str, dict]) -> dict[str, float]:
        """The selection at ``fraction`` as a detector of misaligned pairs (module docstring); ``truth``:
        uid -> the world pool's pair with its ``aligned`` flag and caption ``kind``."""
        kept_file = str(self.selection_dir(fraction) / "kept.parquet").replace("'", "''")
        kept = {row[0] for row in duckdb.connect().execute(f"SELECT uid FROM '{kept_file}'").fetchall()}
        bad = {uid for uid, pair in truth.items() if not pair["aligned"]}
        dropped = set(truth) - kept
        caught = len(dropped & bad)
        prefix = f"keep{round(100 * fraction)}_"
        metrics = {
            prefix + "drop_precision": 100.0 * caught / max(len(dropped), 1),
            prefix + "drop_recall": 100.0 * caught / max(len(bad), 1),
        }
        per_kind = Counter(pair["kind"] for pair in truth.values())
        kept_kinds = Counter(truth[uid]["kind"] for uid in kept)
        for kind in sorted(per_kind):
            metrics[f"{prefix}kept_{kind}"] = 100.0 * kept_kinds[kind] / per_kind[kind]
        return metrics

    def save_pretrained(self, out_dir: Path) -> None:
        for name in SELECTION_FILES:
            shutil.copy2(self.selection_dir(self.options.keep) / name, out_dir / name)
        for fraction in self.options.report_keeps:
            shutil.copytree(self.selection_dir(fraction), out_dir / self.selection_dir(fraction).name)
