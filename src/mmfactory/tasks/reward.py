"""Filter & Align's reward model (arXiv 2312.06726), the ``image_text_reward`` task: an image-text scorer
trained on caption rankings with the Bradley-Terry loss.

Model: a CLIP dual encoder (``init_from`` a CLIP stage, a local folder, or ``tiny``) and a fusion head on
its L2-normalised embeddings ``i``, ``t`` (``D`` wide)::

    r(i, t) = s * cos(i, t) + MLP([i, t, i * t])        (MLP: 3D -> head_hidden -> 1, GELU)

The MLP's output layer starts at zero and ``s`` at ``cosine_scale``, so a fresh reward model *is* the
CLIP-score filter and learns from the rankings what cosine similarity misses; which parameters train (the
head alone, or the towers too) is the stage's ``trainable``.

Data: ``ranking`` sources (``format: world, kind: rankings`` or rankings JSONL). Every ranking becomes
its ``(chosen, rejected, target)`` pairs (:func:`~mmfactory.data.readers.ranking.ranking_pairs`; ties
excluded, or kept with target 0.5 with ``data.ties: half``), counted as ``{split}/pairs``.

``evaluate``: pairwise accuracy of the reward on the held-out rankings' strict pairs
(``eval_pair_accuracy``), beside the same accuracy of the plain CLIP cosine
(``eval_cosine_pair_accuracy``), in percent; a tie in score counts half.

``final/`` is the CLIP folder (``CLIPModel.from_pretrained`` reads it) plus ``reward_head.safetensors``
and ``reward_head.json`` (:func:`load_reward_model`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmfactory.config import ConfigError
from mmfactory.data.readers.ranking import ranking_pairs
from mmfactory.data.samples import Samples
from mmfactory.data.sources import SourceConfig, check_fraction
from mmfactory.losses.reward import bradley_terry_loss
from mmfactory.tasks.base import TrainingTask
from mmfactory.tasks.image_text import CLIPSpec, clip_pixel_values, load_clip, tokenize_for_clip

HEAD_CONFIG, HEAD_WEIGHTS = "reward_head.json", "reward_head.safetensors"


class RewardHead(nn.Module):
    """``[N, D]`` normalised image and text embeddings -> ``[N]`` rewards (module docstring)."""

    def __init__(self, dim: int, hidden: int, cosine_scale: float):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.cosine_scale = nn.Parameter(torch.tensor(float(cosine_scale)))
        self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        fused = torch.cat([image, text, image * text], dim=-1)
        return self.cosine_scale * (image * text).sum(-1) + self.mlp(fused).squeeze(-1)


class ImageTextRewardModel(nn.Module):
    """CLIP + :class:`RewardHead`: ``score(pixel_values, input_ids, attention_mask) -> [N]``."""

    def __init__(self, clip, head: RewardHead):
        super().__init__()
        self.clip, self.head = clip, head

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        return F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    def embed_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(out, dim=-1)

    def score(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.embed_images(pixel_values), self.embed_texts(input_ids, attention_mask))

    def save_pretrained(self, folder: Path) -> None:
        self.clip.save_pretrained(folder)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
            folder / HEAD_WEIGHTS,
        )
        (folder / HEAD_CONFIG).write_text(json.dumps({"dim": self.head.dim, "hidden": self.head.hidden}))


def load_reward_model(folder: str | Path):
    """``(model, tokenizer, image_processor)`` of a saved reward model (a stage's ``final/``)."""
    folder = Path(folder)
    if not (folder / HEAD_CONFIG).is_file():
        raise FileNotFoundError(f"{folder}: no {HEAD_CONFIG}; not a reward model saved by image_text_reward")
    clip, tokenizer, image_processor = load_clip(CLIPSpec(), folder)
    config = json.loads((folder / HEAD_CONFIG).read_text())
    head = RewardHead(config["dim"], config["hidden"], 0.0)
    head.load_state_dict(load_file(folder / HEAD_WEIGHTS))
    return ImageTextRewardModel(clip, head).eval(), tokenizer, image_processor


@dataclass
class RewardModelSpec(CLIPSpec):
    """The CLIP towers (:class:`~mmfactory.tasks.image_text.CLIPSpec`, or the stage's ``init_from``) and
    the fusion head."""

    head_hidden: int = 256
    cosine_scale: float = 10.0  # s at initialisation: a fresh head ranks exactly as the CLIP cosine

    def validate(self) -> None:
        CLIPSpec.validate(self)
        if self.head_hidden < 1:
            raise ConfigError(f"head_hidden: must be >= 1, got {self.head_hidden}")


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
        if not self.train:
            raise ConfigError("train: at least one source is required")
        check_fraction(self.max_bad_fraction)
        if self.margin < 0:
            raise ConfigError(f"margin: must be >= 0, got {self.margin}")


@dataclass
class RewardOptions:
    eval_batch_size: int = 64


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
        init_dir = ctx.resolve_init(stage.init_from)
        if init_dir is not None and (init_dir / HEAD_CONFIG).is_file():
            self.model, self.tokenizer, self.image_processor = load_reward_model(init_dir)
        else:
            clip, self.tokenizer, self.image_processor = load_clip(model_cfg, init_dir)
            head = RewardHead(clip.config.projection_dim, model_cfg.head_hidden, model_cfg.cosine_scale)
            self.model = ImageTextRewardModel(clip, head)
        self.max_text_length = (
            data_cfg.max_text_length or self.model.clip.config.text_config.max_position_embeddings
        )
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
            tokens = tokenize_for_clip(self.tokenizer, [s[side] for s in samples], self.max_text_length)
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
        cosine_gap = (image * texts["chosen"]).sum(-1) - (image * texts["rejected"]).sum(-1)
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

    def save_pretrained(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
