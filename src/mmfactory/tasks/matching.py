"""The image-text matching baseline of Filter & Align (BLIP-score filtering), the ``image_text_matching``
task: the reward model's scorer (:class:`~mmfactory.models.image_text_scorer.ImageTextScorer`, same towers
and head) trained as BLIP trains its ITM head, from matched pairs alone, with no human rankings.

Per batch of ``B`` matched pairs, BLIP's hard-negative mining: each image draws one negative caption and
each caption one negative image from the batch, with probabilities ``softmax(exp(tau) * cos)`` over the
others (the CLIP similarity, no gradient; captions equal to the positive are never negatives). The head's
score ``r`` is a match logit, trained with binary cross-entropy over the ``B`` positives and ``2B``
negatives (BLIP's two-way softmax on one logit)::

    loss = mean over the 3B pairs of BCE(sigmoid(r), y)        (y = 1 for a matched pair, else 0)

``itm_accuracy``: the share of the ``3B`` pairs whose logit has the right sign. The saved folder is a scorer
folder, so ``mmfactory filter score --scorer reward`` (or a ``pool_filter`` stage) scores a pool by the
match logit: BLIP-score filtering.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfactory.data.image_text import ImageCaptionDataset, ImageCaptions
from mmfactory.models.clip import clip_pixel_values
from mmfactory.models.image_text_scorer import Encoded, tokenize_texts
from mmfactory.tasks.base import TrainingTask
from mmfactory.tasks.image_text import ImageTextDataConfig
from mmfactory.tasks.reward import RewardModelSpec, build_scorer, save_scorer_folder


@dataclass
class MatchingOptions:
    pass


def mine_hard_negatives(similarity: Tensor, same: Tensor, generator: torch.Generator | None = None):
    """One negative column per row and one negative row per column of ``similarity [B, B]`` (logits),
    drawn with ``softmax`` weights over the entries ``same`` does not mark as matches; returns
    ``(text_of_image [B], image_of_text [B])`` indices."""
    blocked = same | torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    logits = similarity.masked_fill(blocked, float("-inf"))
    # A row with no admissible entry (every caption of the batch equal) draws uniformly among the others.
    logits = torch.where(torch.isinf(logits).all(-1, keepdim=True), torch.zeros_like(logits), logits)
    text_of_image = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(-1)
    columns = similarity.T.masked_fill(blocked.T, float("-inf"))
    columns = torch.where(torch.isinf(columns).all(-1, keepdim=True), torch.zeros_like(columns), columns)
    image_of_text = torch.multinomial(F.softmax(columns, -1), 1, generator=generator).squeeze(-1)
    return text_of_image, image_of_text


def _take(encoded: Encoded, index: Tensor) -> Encoded:
    mask = None if encoded.mask is None else encoded.mask[index]
    return Encoded(encoded.embedding[index], encoded.tokens[index], mask)


def matching_loss(positive: Tensor, negatives: Tensor) -> Tensor:
    """Mean binary cross-entropy of match logits: ``positive [B]`` (label 1), ``negatives [M]`` (label 0)."""
    logits = torch.cat([positive, negatives])
    labels = torch.cat([torch.ones_like(positive), torch.zeros_like(negatives)])
    return F.binary_cross_entropy_with_logits(logits, labels)


class ImageTextMatchingTask(TrainingTask):
    model_config = RewardModelSpec
    data_config = ImageTextDataConfig
    options_config = MatchingOptions
    sample_kind = "image-text"

    def __init__(self, stage, ctx, model_cfg: RewardModelSpec, data_cfg: ImageTextDataConfig, options):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        init_dir = ctx.resolve_init(stage.init_from)
        self.model, self.tokenizer, self.image_processor = build_scorer(model_cfg, init_dir)
        self.max_text_length = data_cfg.max_text_length or self.model.max_text_length
        self.counts: Counter[str] = Counter()
        self._sources: dict[str, ImageCaptions] = {}

    def image_captions(self, split: str) -> ImageCaptions:
        if split not in self._sources:
            self._sources[split] = self.read_sources(split, self.counts) or ImageCaptions.empty()
        return self._sources[split]

    def train_dataset(self) -> ImageCaptionDataset:
        return ImageCaptionDataset(self.image_captions("train"), train=True)

    def eval_dataset(self) -> ImageCaptionDataset | None:
        source = self.image_captions("eval")
        return ImageCaptionDataset(source, train=False) if len(source) > 1 else None

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        """``pixel_values [B, 3, S, S]``, ``input_ids`` / ``attention_mask [B, L]`` and ``same [B, B]``
        (True where two samples' captions are equal)."""
        captions = [s["caption"] for s in samples]
        return {
            "pixel_values": clip_pixel_values(
                self.image_processor, [s["image"] for s in samples], self.data_cfg.pad_square
            ),
            **tokenize_texts(self.model, self.tokenizer, captions, self.max_text_length),
            "same": torch.tensor([[a == b for b in captions] for a in captions]),
        }

    def data_report(self) -> dict[str, int]:
        report = {f"{split}/images": len(source) for split, source in self._sources.items()}
        return {**report, **self.counts}

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image = self.model.embed_images(batch["pixel_values"])
        text = self.model.embed_texts(batch["input_ids"], batch["attention_mask"])
        with torch.no_grad():
            similarity = self.model.clip.logit_scale.exp() * image.embedding @ text.embedding.T
            text_of_image, image_of_text = mine_hard_negatives(similarity, batch["same"])
        head = self.model.head
        positive = head(image, text)
        negatives = torch.cat(
            [head(image, _take(text, text_of_image)), head(_take(image, image_of_text), text)]
        )
        correct = torch.cat([positive > 0, negatives < 0]).float()
        return {"loss": matching_loss(positive, negatives), "itm_accuracy": 100 * correct.mean()}

    def save_pretrained(self, out_dir: Path) -> None:
        save_scorer_folder(self, out_dir)
