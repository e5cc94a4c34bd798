"""Filter & Align's reward model (arXiv 2312.06726), the ``image_text_reward`` task: an image-text scorer
trained on caption rankings with the Bradley-Terry loss.

Model: :class:`~mmfactory.models.image_text_scorer.ImageTextScorer`, a CLIP dual encoder (``init_from`` a
CLIP stage, a local folder, or ``tiny``) with a head ``r(i, t) = s * cos(i, t) + f(i, t)`` whose fusion ``f``
(``fusion: mlp`` on the global embeddings, or ``cross``: an image-grounded text encoder over the towers'
token states, BLIP-ITM / ImageReward style) starts at zero, so a fresh reward model *is* the CLIP-score
filter and learns from the rankings what cosine similarity misses; which parameters train (the head alone,
or the towers too) is the stage's ``trainable``.

Data: ``ranking`` sources (``format: world, kind: rankings`` or rankings JSONL). Every ranking becomes
its ``(chosen, rejected, target)`` pairs (:func:`~mmfactory.data.readers.ranking.ranking_pairs`; ties
excluded, or kept with target 0.5 with ``data.ties: half``), counted as ``{split}/pairs``.

``evaluate``: pairwise accuracy of the reward on the held-out rankings' strict pairs
(``eval_pair_accuracy``), beside the same accuracy of the plain CLIP cosine
(``eval_cosine_pair_accuracy``), in percent; a tie in score counts half; both also per caption-kind pair
when the rankings name their captions' kinds (``eval_pair_accuracy/detailed>wrong_attribute``, ...).

``final/`` is the CLIP folder (``CLIPModel.from_pretrained`` reads it) plus ``reward_head.safetensors``
and ``reward_head.json`` (:func:`~mmfactory.models.image_text_scorer.load_scorer`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from mmfactory.config import ConfigError
from mmfactory.data.readers.ranking import ranking_pairs
from mmfactory.data.samples import Samples
from mmfactory.data.source_config import SourceConfig, check_sources
from mmfactory.losses.reward import bradley_terry_loss
from mmfactory.models.clip import CLIPSpec, clip_pixel_values, load_clip
from mmfactory.models.hub import resolve_model_folder
from mmfactory.models.image_text_scorer import (
    HEAD_CONFIG,
    ImageTextScorer,
    ScorerHead,
    head_config_for,
    load_scorer,
    load_text_side,
    tokenize_texts,
)
from mmfactory.tasks.base import TrainingTask


@dataclass
class RewardModelSpec(CLIPSpec):
    """The CLIP towers (:class:`~mmfactory.models.clip.CLIPSpec`, or the stage's ``init_from``) and
    the fusion head."""

    fusion: Literal["mlp", "cross"] = "mlp"  # mmfactory.models.image_text_scorer
    # the text side: None = CLIP's text tower; else a transformers text encoder (local folder or hub id,
    # e.g. sentence-transformers/all-MiniLM-L6-v2) pooled by text_pooling (auto: the folder's own pooling)
    text_encoder: str | None = None
    text_pooling: Literal["auto", "mean", "cls", "max"] = "auto"
    head_hidden: int = 256  # the MLP's hidden width, or the cross head's width
    head_layers: int = 2  # cross: image-grounded blocks
    head_heads: int = 4  # cross: attention heads
    cosine_scale: float = 10.0  # s at initialisation: a fresh head ranks exactly as the CLIP cosine

    def validate(self) -> None:
        CLIPSpec.validate(self)
        for name in ("head_hidden", "head_layers", "head_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.head_hidden % self.head_heads:
            raise ConfigError(
                f"head_hidden: {self.head_hidden} is not a multiple of head_heads {self.head_heads}"
            )


@dataclass
class RewardDataConfig:
    """Caption rankings from any ``ranking`` sources (:mod:`mmfactory.data.sources`)."""

    train: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="rankings", size=2000)]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="rankings", split="val", size=200)]
    )
    max_bad_fraction: float | None = None
    ties: Literal["exclude", "half"] = "exclude"  # half: a tied pair trains toward equal rewards
    margin: float = 0.0  # the chosen reward must win by this much (0: plain Bradley-Terry)
    max_text_length: int | None = None  # None: the text model's positions
    pad_square: bool = False

    def validate(self) -> None:
        check_sources(self.train, self.max_bad_fraction)
        if self.margin < 0:
            raise ConfigError(f"margin: must be >= 0, got {self.margin}")


@dataclass
class RewardOptions:
    eval_batch_size: int = 64


def build_scorer(model_cfg: RewardModelSpec, init_dir: Path | None):
    """``(scorer, tokenizer, image_processor)``: a saved scorer from ``init_dir``, or a CLIP (``init_dir``,
    or ``model_cfg``'s) with a fresh head (and ``text_encoder`` as the text side, the head projecting it);
    the tokenizer is the CLIP's."""
    if init_dir is not None and (init_dir / HEAD_CONFIG).is_file():
        return load_scorer(init_dir)
    clip, tokenizer, image_processor = load_clip(model_cfg, init_dir)
    m, text_side = model_cfg, None
    if m.text_encoder is not None:
        folder = resolve_model_folder(m.text_encoder, "text_encoder")
        text_side = load_text_side(folder, m.text_pooling)
    config = head_config_for(clip, m.fusion, m.head_hidden, m.head_layers, m.head_heads, text_side)
    return ImageTextScorer(clip, ScorerHead(config, m.cosine_scale), text_side), tokenizer, image_processor


def save_scorer_folder(task: TrainingTask, out_dir: Path) -> None:
    """A scorer task's ``final/``: the scorer, its (CLIP's) tokenizer and its image processor."""
    task.model.save_pretrained(out_dir)
    task.tokenizer.save_pretrained(out_dir)
    task.image_processor.save_pretrained(out_dir)


class RankedPairs(torch.utils.data.Dataset):
    """Item ``p``: ``{"image": uint8 [H, W, 3], "chosen": str, "rejected": str, "target": float}``."""

    def __init__(self, rankings: Samples, pairs: list[tuple[int, int, int, float]]):
        self.rankings, self.pairs = rankings, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        ranking, chosen, rejected, target = self.pairs[index]
        captions = self.rankings.items[ranking]["captions"]
        return {
            "image": self.rankings.media(ranking),
            "chosen": captions[chosen],
            "rejected": captions[rejected],
            "target": target,
        }


class ImageTextRewardTask(TrainingTask):
    model_config = RewardModelSpec
    data_config = RewardDataConfig
    options_config = RewardOptions
    loss_unit = "pairs"
    sample_kind = "ranking"

    def __init__(self, stage, ctx, model_cfg: RewardModelSpec, data_cfg: RewardDataConfig, options):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.model, self.tokenizer, self.image_processor = build_scorer(
            model_cfg, ctx.resolve_init(stage.init_from)
        )
        self.max_text_length = data_cfg.max_text_length or self.model.max_text_length
        self.counts: Counter[str] = Counter()
        self._data: dict[str, RankedPairs | None] = {}

    # -- data ----------------------------------------------------------------------------------------
    def ranked_pairs(self, split: str, ties: str | None = None) -> RankedPairs | None:
        """The split's pairs (``ties`` defaults to ``data.ties``; evaluation scores strict pairs only)."""
        key = f"{split}:{ties}"
        if key not in self._data:
            rankings = self.read_sources(split, self.counts)
            if rankings is None:
                self._data[key] = None
            else:
                pairs = [
                    (r, i, j, target)
                    for r, item in enumerate(rankings.items)
                    for i, j, target in ranking_pairs(
                        item["captions"], item["ranks"], ties or self.data_cfg.ties
                    )
                ]
                self.counts[f"{split}/rankings"] = len(rankings)
                self.counts[f"{split}/pairs"] = len(pairs)
                self._data[key] = RankedPairs(rankings, pairs)
        return self._data[key]

    def train_dataset(self) -> RankedPairs:
        return self.ranked_pairs("train")

    def eval_dataset(self) -> RankedPairs | None:
        pairs = self.ranked_pairs("eval", "exclude")
        return pairs if pairs is not None and len(pairs) else None

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        """``pixel_values [B, 3, S, S]``, ``chosen_*`` / ``rejected_*`` token ids and masks ``[B, L]``,
        ``target [B]``."""
        images = [s["image"] for s in samples]
        batch = {"pixel_values": clip_pixel_values(self.image_processor, images, self.data_cfg.pad_square)}
        for side in ("chosen", "rejected"):
            texts = [s[side] for s in samples]
            tokens = tokenize_texts(self.model, self.tokenizer, texts, self.max_text_length)
            batch.update({f"{side}_{k}": v for k, v in tokens.items()})
        batch["target"] = torch.tensor([s["target"] for s in samples], dtype=torch.float32)
        return batch

    def data_report(self) -> dict[str, int]:
        return dict(self.counts)

    # -- math ----------------------------------------------------------------------------------------
    def rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``[B]`` rewards of chosen and rejected captions and ``[B]`` their cosines' difference."""
        image = self.model.embed_images(batch["pixel_values"])
        texts = {
            side: self.model.embed_texts(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
            for side in ("chosen", "rejected")
        }
        cosine_gap = (image.embedding * (texts["chosen"].embedding - texts["rejected"].embedding)).sum(-1)
        return self.model.head(image, texts["chosen"]), self.model.head(image, texts["rejected"]), cosine_gap

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        chosen, rejected, cosine_gap = self.rewards(batch)
        target = batch["target"]
        loss = bradley_terry_loss(
            chosen, rejected, self.data_cfg.margin, None if (target == 1).all() else target
        )
        strict = target == 1
        wins = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float())[strict]
        cosine_wins = ((cosine_gap > 0).float() + 0.5 * (cosine_gap == 0).float())[strict]
        return {
            "loss": loss,
            "pair_accuracy": 100 * wins.mean() if strict.any() else torch.zeros(()),
            "cosine_pair_accuracy": 100 * cosine_wins.mean() if strict.any() else torch.zeros(()),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Pair accuracy of the reward and of the plain cosine per caption-kind pair
        (``eval_pair_accuracy/{chosen kind}>{rejected kind}``, in percent, a tie counting half) when the
        held-out rankings name their captions' kinds (the world's do): which comparisons the reward model
        learnt beyond the cosine, and which it lost."""
        pairs = self.eval_dataset()
        if pairs is None or not all("kinds" in item for item in pairs.rankings.items):
            return {}
        device, size = next(self.model.parameters()).device, self.options.eval_batch_size
        wins: dict[str, list[float]] = {}
        for lo in range(0, len(pairs), size):
            index = range(lo, min(lo + size, len(pairs)))
            batch = {k: v.to(device) for k, v in self.collate([pairs[i] for i in index]).items()}
            chosen, rejected, cosine_gap = self.rewards(batch)
            for i, c, r, g in zip(
                index, chosen.tolist(), rejected.tolist(), cosine_gap.tolist(), strict=True
            ):
                ranking, a, b, _ = pairs.pairs[i]
                kinds = pairs.rankings.items[ranking]["kinds"]
                counts = wins.setdefault(f"{kinds[a]}>{kinds[b]}", [0.0, 0.0, 0])
                counts[0] += (c > r) + 0.5 * (c == r)
                counts[1] += (g > 0) + 0.5 * (g == 0)
                counts[2] += 1
        metrics = {}
        for key, (reward, cosine, n) in sorted(wins.items()):
            metrics[f"eval_pair_accuracy/{key}"] = 100.0 * reward / n
            metrics[f"eval_cosine_pair_accuracy/{key}"] = 100.0 * cosine / n
        return metrics

    def save_pretrained(self, out_dir: Path) -> None:
        save_scorer_folder(self, out_dir)
