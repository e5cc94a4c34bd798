"""Masked contrastive video-text pretraining (MAC), the ``video_text_contrastive`` task.

``forward``: the video encoder sees only ``1 - video_mask_ratio`` of every frame's patches (tube or per-frame
masks) and the text encoder ``1 - text_mask_ratio`` of the caption tokens; the projected video and text CLS
features go into the symmetric InfoNCE of :func:`~mmfactory.losses.contrastive.clip_loss` (features gathered
across processes with gradients). No reconstruction: MAC's "masked-then-alignment". Masking is applied in
training only; evaluation encodes full inputs.

``evaluate``: text->video and video->text retrieval over held-out videos with all their captions (R@1/5/10 in
percent, median and mean rank), and the cost of one training step on a train micro-batch — FLOPs of the
forward + backward (``FlopCounterMode``) and its wall time — so masked and unmasked runs compare directly.

The loss of a micro-batch depends on the negatives it holds, so gradient accumulation is not equivalent to a
larger batch here (as in CLIP): grow ``train.batch_size`` or the number of processes instead.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mmfactory.config import ConfigError
from mmfactory.data.media import FrameSampling
from mmfactory.data.samples import Samples
from mmfactory.data.source_config import SourceConfig, check_sources
from mmfactory.data.video_text import video_clip
from mmfactory.eval.flops import count_flops
from mmfactory.eval.metrics import text_video_retrieval
from mmfactory.examples import retrieval_examples, write_examples
from mmfactory.losses.contrastive import clamp_logit_scale, clip_loss, gather_world_size
from mmfactory.models.components.vit import MaskKind
from mmfactory.models.dual_encoder import DualEncoderSpec, TextMaskMode, load_dual_encoder, tokenize_captions
from mmfactory.tasks.base import TrainingTask


@dataclass
class VideoTextDataConfig:
    """Videos with several captions each from any ``video-text`` sources (:mod:`mmfactory.data.sources`):
    the world (``kind: videos``), MSR-VTT-style CSV (``format: csv``, videos at ``{video_root}/{id}.mp4``)."""

    train: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="videos", size=512)]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="videos", split="val", size=64)]
    )
    max_bad_fraction: float | None = None  # stop when a source has more bad records than this share
    num_frames: int = 4  # frames per clip, chosen by frame_indices (TSN segments)
    frame_sampling: FrameSampling = "uniform"  # training clips; evaluation always takes segment middles
    max_text_length: int = 32  # tokens including [CLS] and [SEP]

    def validate(self) -> None:
        check_sources(self.train, self.max_bad_fraction)
        if self.num_frames < 1:
            raise ConfigError(f"num_frames: must be >= 1, got {self.num_frames}")


@dataclass
class ContrastiveOptions:
    """MAC's masking (training only) and what ``evaluate`` measures."""

    video_mask_ratio: float = 0.75  # fraction of each frame's patches dropped before the encoder
    # frame: each frame draws its own mask (MAC's figure); tube: one spatial mask for all frames (VideoMAE)
    video_mask_kind: MaskKind = "frame"
    text_mask_ratio: float = 0.15
    # replace: [MASK] in place of the masked tokens (MAC's figure); drop: removed like the video patches
    text_mask_mode: TextMaskMode = "replace"
    eval_batch_size: int = 64  # videos or captions per encoder call in retrieval
    profile_steps: int = 3  # timed training forward+backward passes in evaluate (single process); 0: none

    def validate(self) -> None:
        for name in ("video_mask_ratio", "text_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")


def fit_frames(frames: Tensor, size: int) -> Tensor:
    """uint8 ``[T, H, W, 3]`` -> ``[T, size, size, 3]``: shorter side resized to ``size`` (bilinear,
    antialiased), then a centre crop; frames already that size are returned as they are."""
    _, h, w, _ = frames.shape
    if h == w == size:
        return frames
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(
        frames.permute(0, 3, 1, 2).float(), size=(new_h, new_w), mode="bilinear", antialias=True
    )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class VideoCaptions(Dataset):
    """Item ``i``: ``{"video": uint8 [num_frames, H, W, 3], "caption": str}`` of video ``i`` of ``videos``
    (``video-text`` :class:`~mmfactory.data.samples.Samples`). Training draws the caption (and, with
    ``random`` sampling, the frames) from torch's RNG, so resumed runs replay it; otherwise the first
    caption and the segment-middle frames."""

    def __init__(self, videos: Samples, num_frames: int, sampling: FrameSampling, train: bool):
        self.videos, self.num_frames, self.train = videos, num_frames, train
        self.sampling: FrameSampling = sampling if train else "uniform"

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict:
        captions = self.videos.items[index]["captions"]
        rng = np.random.default_rng(int(torch.randint(2**62, ()))) if self.sampling == "random" else None
        frames = video_clip(self.videos.media(index), self.num_frames, self.sampling, rng)
        caption = captions[int(torch.randint(len(captions), ()))] if self.train else captions[0]
        return {"video": frames, "caption": caption}


class VideoTextContrastiveTask(TrainingTask):
    model_config = DualEncoderSpec
    data_config = VideoTextDataConfig
    options_config = ContrastiveOptions
    sample_kind = "video-text"

    def __init__(
        self,
        stage,
        ctx,
        model_cfg: DualEncoderSpec,
        data_cfg: VideoTextDataConfig,
        options: ContrastiveOptions,
    ):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        vision_init = None
        if model_cfg.vision_init is not None and stage.init_from is not None:
            raise ConfigError(
                f"stages.{stage.name}.model.vision_init: init_from already loads the whole model; "
                "set model.vision_init=null, or drop init_from"
            )
        if model_cfg.vision_init is not None:
            from mmfactory.models.hub import resolve_model_folder

            vision_init = ctx.stage_path(model_cfg.vision_init) or resolve_model_folder(
                model_cfg.vision_init, "model.vision_init (a CLIP vision tower)"
            )
        self.model, self.tokenizer = load_dual_encoder(
            model_cfg, ctx.resolve_init(stage.init_from), vision_init
        )
        self.counts: Counter = Counter()
        self._videos: dict[str, Samples] = {}

    # -- data ----------------------------------------------------------------------------------------
    def videos(self, split: Literal["train", "eval"]) -> Samples:
        """The split's ``video-text`` samples (empty when it names no sources)."""
        if split not in self._videos:
            self._videos[split] = self.read_sources(split, self.counts) or Samples([])
        return self._videos[split]

    def train_dataset(self) -> VideoCaptions:
        return VideoCaptions(
            self.videos("train"), self.data_cfg.num_frames, self.data_cfg.frame_sampling, True
        )

    def eval_dataset(self) -> VideoCaptions | None:
        """The eval videos with their first captions, cut to a multiple of the process count: the loss
        gathers equal-sized batches from every process, so every shard must batch alike."""
        videos = self.videos("eval")
        processes = gather_world_size()
        usable = len(videos) // processes * processes
        if not usable:
            return None
        return VideoCaptions(videos.first(usable), self.data_cfg.num_frames, "uniform", False)

    def _clips(self, videos: list[np.ndarray]) -> Tensor:
        size = self.model.vision_model.config.image_size
        return torch.stack([fit_frames(torch.from_numpy(np.ascontiguousarray(v)), size) for v in videos])

    def _captions(self, texts: list[str]) -> dict[str, Tensor]:
        return tokenize_captions(self.tokenizer, texts, self.data_cfg.max_text_length)

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        """``video`` uint8 ``[B, T, S, S, 3]`` plus the captions' ``input_ids``, ``attention_mask`` and
        ``special_tokens_mask`` ``[B, L]``."""
        return {
            "video": self._clips([s["video"] for s in samples]),
            **self._captions([s["caption"] for s in samples]),
        }

    def data_report(self) -> dict[str, int]:
        return {**{f"{split}/videos": len(videos) for split, videos in self._videos.items()}, **self.counts}

    # -- math ----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        opts = self.options
        out = self.model(
            batch["video"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["special_tokens_mask"],
            video_mask_ratio=opts.video_mask_ratio if self.training else 0.0,
            video_mask_kind=opts.video_mask_kind,
            text_mask_ratio=opts.text_mask_ratio if self.training else 0.0,
            text_mask_mode=opts.text_mask_mode,
        )
        max_scale = self.model.config.max_logit_scale
        loss = clip_loss(out.video_embeds, out.text_embeds, out.log_logit_scale, max_scale)
        return {"loss": loss, "logit_scale": clamp_logit_scale(out.log_logit_scale, max_scale).exp().detach()}

    # -- evaluation and output -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        metrics = self.retrieval()
        # The loss gathers features across processes, and evaluate runs on the main process alone.
        single_process = gather_world_size() == 1
        if self.options.profile_steps > 0 and single_process:
            metrics.update(self.profile_training_step())
        return metrics

    @torch.no_grad()
    def retrieval(self, videos: Samples | None = None) -> dict[str, float]:
        """``t2v_*`` and ``v2t_*`` R@1/5/10, MdR, MnR over ``videos`` (``video-text`` samples; default: the
        eval set) and all their captions, full inputs, segment-middle frames."""
        videos = self.videos("eval") if videos is None else videos
        if not len(videos):
            return {}
        device, batch, num_frames = self.model.device, self.options.eval_batch_size, self.data_cfg.num_frames
        video_embeds, captions, video_of_text = [], [], []
        for lo in range(0, len(videos), batch):
            indices = range(lo, min(lo + batch, len(videos)))
            clips = [video_clip(videos.media(i), num_frames, "uniform", None) for i in indices]
            video_embeds.append(self.model.encode_video(self._clips(clips).to(device)))
            for i in indices:
                captions += videos.items[i]["captions"]
                video_of_text += [i] * len(videos.items[i]["captions"])
        text_embeds = []
        for lo in range(0, len(captions), batch):
            tokens = {k: v.to(device) for k, v in self._captions(captions[lo : lo + batch]).items()}
            text_embeds.append(self.model.encode_text(tokens["input_ids"], tokens["attention_mask"]))
        similarity = (
            F.normalize(torch.cat(text_embeds), dim=-1) @ F.normalize(torch.cat(video_embeds), dim=-1).T
        )
        results = text_video_retrieval(similarity, video_of_text)
        metrics = {
            f"{direction}_{name}": value for direction, m in results.items() for name, value in m.items()
        }
        if self.ctx.is_main_process:

            def middle_frame(i: int) -> np.ndarray:
                frames = video_clip(videos.media(i), num_frames, "uniform", None)
                return frames[len(frames) // 2]

            shown = retrieval_examples(similarity.cpu(), captions, video_of_text, middle_frame)
            write_examples(self.ctx.stage_dir, "Text-to-video retrieval", shown)
        return {**metrics, "retrieval_videos": len(videos), "retrieval_captions": len(captions)}

    def profile_training_step(self) -> dict[str, float]:
        """Cost of one training forward + backward (masking on, no optimizer step) on the first
        ``train.batch_size`` training samples: ``step_gflops`` and the median ``step_ms`` of
        ``profile_steps`` timed passes after a warm-up. Gradients are cleared afterwards."""
        train = self.train_dataset()
        samples = [train[i] for i in range(min(self.stage.train.batch_size, len(train)))]
        batch = {k: v.to(self.model.device) for k, v in self.collate(samples).items()}
        was_training = self.training
        self.train()

        def step() -> None:
            self(batch)["loss"].backward()
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()  # time the kernels, not their launch

        with torch.enable_grad():
            step()  # warm-up
            flops = count_flops(step)
            times = []
            for _ in range(self.options.profile_steps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        self.zero_grad(set_to_none=True)
        self.train(was_training)
        return {"step_gflops": flops / 1e9, "step_ms": 1000 * statistics.median(times)}

    def save_pretrained(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
