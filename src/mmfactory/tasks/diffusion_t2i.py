"""The baseline a user would pick instead of MARS (``t2i_diffusion``): a small text-conditioned diffusion
model from ``diffusers`` (``UNet2DConditionModel`` trained with a ``DDPMScheduler``'s noise-prediction loss,
sampled with ``DDIMScheduler``), conditioned on the same frozen text LM's hidden states that MARS's prompts
go through, with prompt dropout and classifier-free guidance like MARS. Scored by the same judge and
Fréchet distance (:func:`mmfactory.mars.evaluate.evaluate_generator`); its training FLOPs are reported so
that the two are compared at matched compute.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmfactory.config import ConfigError
from mmfactory.data.chat import TemplateName, resolve_template
from mmfactory.eval.flops import stage_training_tflops
from mmfactory.mars.evaluate import GenerationEval, evaluate_generator
from mmfactory.mars.judge import SceneJudge
from mmfactory.models.components.vq import pixels_from_uint8, uint8_from_pixels
from mmfactory.tasks.image_tokenizer import ImageSourcesData, ImageSourcesTask, fitted_uint8

TEXT_META = "text_encoder.json"  # which LM folder and template condition a saved UNet


def _default_unet() -> dict[str, Any]:
    return {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


@dataclass
class DiffusionModelConfig:
    """``text_encoder``: the frozen causal LM (an earlier stage or a folder) whose last hidden states over
    the prompt condition the UNet; ``unet``: ``UNet2DConditionModel`` keyword arguments (``sample_size``,
    channels and ``cross_attention_dim`` are set from the data and the LM)."""

    text_encoder: str = "lm"
    unet: dict[str, Any] = field(default_factory=_default_unet)
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    sample_steps: int = 50  # DDIM steps at sampling

    def validate(self) -> None:
        for key in ("sample_size", "cross_attention_dim", "in_channels", "out_channels"):
            if key in self.unet:
                raise ConfigError(f"unet.{key}: set by the task (image size, the LM's width, RGB)")
        if not 1 <= self.sample_steps <= self.train_timesteps:
            raise ConfigError(f"sample_steps: in [1, train_timesteps], got {self.sample_steps}")


@dataclass
class DiffusionData(ImageSourcesData):
    image_size: int = 32
    max_prompt_length: int = 96
    template: TemplateName = "chatml"


@dataclass
class DiffusionOptions:
    cfg_dropout: float = 0.1
    generation: GenerationEval = field(default_factory=GenerationEval)
    judge: str | None = None
    eval_batch_size: int = 64

    def validate(self) -> None:
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ConfigError(f"cfg_dropout: a fraction in [0, 1), got {self.cfg_dropout}")


class DiffusionT2ITask(ImageSourcesTask):
    model_config = DiffusionModelConfig
    data_config = DiffusionData
    options_config = DiffusionOptions
    sample_kind = "image-text"
    loss_unit = "images"

    def __init__(self, stage, ctx, model_cfg: DiffusionModelConfig, data_cfg: DiffusionData, options):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.lm_dir = ctx.resolve_init(model_cfg.text_encoder, "model.text_encoder")
        self.text_encoder = AutoModelForCausalLM.from_pretrained(self.lm_dir).requires_grad_(False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.lm_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        init_dir = ctx.resolve_init(stage.init_from)
        if init_dir is not None:
            self.unet = UNet2DConditionModel.from_pretrained(init_dir)
        else:
            self.unet = UNet2DConditionModel(
                sample_size=data_cfg.image_size,
                in_channels=3,
                out_channels=3,
                cross_attention_dim=self.text_encoder.config.hidden_size,
                **model_cfg.unet,
            )
        schedule = {
            "num_train_timesteps": model_cfg.train_timesteps,
            "beta_schedule": model_cfg.beta_schedule,
        }
        self.noise_schedule = DDPMScheduler(**schedule)
        self.sampler = DDIMScheduler(**schedule)
        self.template = resolve_template(data_cfg.template, self.tokenizer)

    def _prompt_ids(self, captions: list[str]) -> dict[str, Tensor]:
        """The user turn of each caption (MARS's prompt up to its assistant turn), right-padded."""
        t = self.template
        texts = [t.turn_header("user") + c + t.end for c in captions]
        return self.tokenizer(
            texts,
            add_special_tokens=False,
            padding=True,
            truncation=True,
            max_length=self.data_cfg.max_prompt_length,
            return_tensors="pt",
        )

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        captions = [s["caption"] for s in samples]
        if self.training:  # guidance dropout: the empty user turn, as MARS's unconditional prompt
            drop = torch.rand(len(captions)) < self.options.cfg_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        tokens = self._prompt_ids(captions)
        images = fitted_uint8([s["image"] for s in samples], self.data_cfg.image_size)
        return {
            "images": images,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The frozen LM's last hidden states ``[B, T, D]`` over the prompt tokens."""
        return self.text_encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = pixels_from_uint8(batch["images"])
        context = self.encode_text(batch["input_ids"], batch["attention_mask"])
        noise = torch.randn_like(x)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (len(x),), device=x.device)
        noisy = self.noise_schedule.add_noise(x, noise, t)
        predicted = self.unet(
            noisy, t, encoder_hidden_states=context, encoder_attention_mask=batch["attention_mask"]
        ).sample
        return {"loss": F.mse_loss(predicted, noise)}

    @torch.no_grad()
    def draw(self, captions: list[str], scale: float, seed: int) -> np.ndarray:
        """uint8 ``[N, S, S, 3]``: DDIM sampling with guidance ``eps_u + s (eps_c - eps_u)`` (one batched
        UNet call per step over the conditional and unconditional rows)."""
        device = next(self.unet.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        size, out = self.data_cfg.image_size, []
        self.sampler.set_timesteps(self.model_cfg.sample_steps)
        for start in range(0, len(captions), self.options.eval_batch_size):
            chunk = captions[start : start + self.options.eval_batch_size]
            tokens = self._prompt_ids(chunk + [""] * len(chunk))
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            context = self.encode_text(ids, mask)
            x = torch.randn((len(chunk), 3, size, size), generator=generator, device=device)
            for t in self.sampler.timesteps:
                eps = self.unet(
                    torch.cat([x, x]), t, encoder_hidden_states=context, encoder_attention_mask=mask
                ).sample
                cond, uncond = eps.chunk(2)
                x = self.sampler.step(uncond + scale * (cond - uncond), t, x).prev_sample
            out.append(uint8_from_pixels(x).cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.unet.eval()
        metrics: dict[str, float] = {}
        judge = None
        if self.options.judge is not None:
            judge = SceneJudge.from_pretrained(self.ctx.resolve_init(self.options.judge, "options.judge"))
            judge = judge.to(next(self.unet.parameters()).device).eval()
        source = self.source("eval")
        if len(source):
            stage_dir = self.ctx.stage_dir
            metrics.update(
                evaluate_generator(
                    self.draw, source, judge, self.options.generation, self.data_cfg.image_size, stage_dir
                )
            )
        metrics["train_tflops"] = stage_training_tflops(self)
        return metrics

    def save_pretrained(self, out_dir: Path) -> None:
        """The ``UNet2DConditionModel`` folder, the sampler's config, and which LM encodes its prompts."""
        self.unet.save_pretrained(out_dir)
        self.sampler.save_pretrained(out_dir / "scheduler")
        meta = {
            "text_encoder": str(self.lm_dir),
            "template": self.data_cfg.template,
            **asdict(self.model_cfg),
        }
        (out_dir / TEXT_META).write_text(json.dumps(meta, indent=1))
