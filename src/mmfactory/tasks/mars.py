"""MARS's text-to-image stage (``mars_t2i``): a frozen causal LM with SemVIE visual experts trained by
next-token prediction over text and VQ image codes (alignment with both directions, then T2I refinement),
evaluated by :mod:`mmfactory.mars.evaluate`. The tokenizer and judge stages are in
:mod:`~mmfactory.tasks.image_tokenizer` and :mod:`~mmfactory.tasks.scene_judge`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmfactory.config import ConfigError
from mmfactory.data.chat import IGNORE_INDEX, TemplateName, collate_chats, resolve_template, tokenize_chat
from mmfactory.data.image_text import ImageCaptions
from mmfactory.data.source_config import SourceConfig
from mmfactory.eval.flops import stage_training_tflops
from mmfactory.mars.evaluate import (
    GenerationEval,
    eval_prompts,
    evaluate_generator,
    evaluate_joint,
    generate_captions,
    generate_images,
    text_nll,
)
from mmfactory.mars.generate import GENERATION_META
from mmfactory.mars.judge import SceneJudge
from mmfactory.mars.sampling import SamplingConfig
from mmfactory.mars.sequences import (
    DIRECTIONS,
    Instructions,
    SequenceBuilder,
    T2IDataset,
    fill_codes,
    pad_sequences,
)
from mmfactory.models.components.experts import EXPERT_MODULES
from mmfactory.models.components.vq import (
    VQImageTokenizer,
    pixels_from_uint8,
)
from mmfactory.models.lm import CausalLMConfig, load_causal_lm, load_tokenizer
from mmfactory.models.t2i import T2ILayout, TextToImageLM, is_t2i_folder
from mmfactory.tasks.image_tokenizer import ImageSourcesData, ImageSourcesTask, check_sizes, fitted_uint8


@dataclass
class T2IModelConfig:
    """``lm`` (``path`` may name an earlier stage, e.g. a text LM stage) and ``vq`` (an earlier ``mars_vq``
    stage or a tokenizer folder) build a fresh model; with ``init_from`` an earlier ``mars_t2i`` stage
    provides all three. ``experts``: ``semvie`` (frozen text path + visual experts) or ``none`` (full
    fine-tuning of the LM: the baseline)."""

    lm: CausalLMConfig | None = None
    vq: str | None = None
    experts: Literal["semvie", "none"] = "semvie"
    expert_modules: list[str] = field(default_factory=lambda: list(EXPERT_MODULES))

    def validate(self) -> None:
        if not self.expert_modules and self.experts == "semvie":
            raise ConfigError("expert_modules: SemVIE needs at least one module per layer")


@dataclass
class T2IData(ImageSourcesData):  # eval: the evaluation's prompts and real images
    text_eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="chat", split="val", size=200)]
    )  # held-out text for the LM's perplexity before / after
    image_size: int = 32  # images are tokenised at this side: (image_size / downsample)^2 codes
    max_length: int = 256
    template: TemplateName = "chatml"

    def validate(self) -> None:
        super().validate()
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")


@dataclass
class T2IOptions:
    directions: dict[str, float] = field(default_factory=lambda: {"t2i": 0.6, "caption": 0.2, "joint": 0.2})
    cfg_dropout: float = 0.1  # share of t2i sequences whose caption is dropped (classifier-free guidance)
    instructions: Instructions = field(default_factory=Instructions)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # evaluation's sampling at its scale
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # consistency measured at each
    eval_prompts: int = 64  # eval images per language whose caption is drawn
    fd_samples: int = 100  # per set: generated, real, and the floor's second real set (at sampling's scale)
    eval_captions: int = 32  # per language, images captioned greedily
    joint_samples: int = 8  # joint "draw and describe" replies written to samples/
    judge: str | None = None  # an earlier mars_judge stage or folder; None: no consistency / FD
    text_reference: str | None = None  # the LM before MARS (stage or folder) for perplexity; None: skipped
    eval_batch_size: int = 32
    seed: int = 0

    def validate(self) -> None:
        unknown = set(self.directions) - set(DIRECTIONS)
        if (
            unknown
            or not self.directions
            or min(self.directions.values()) < 0
            or sum(self.directions.values()) <= 0
        ):
            raise ConfigError(
                f"directions: weights >= 0 over {DIRECTIONS} with a positive sum, got {self.directions}"
            )
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ConfigError(f"cfg_dropout: a fraction in [0, 1), got {self.cfg_dropout}")
        if any(s < 0 for s in self.cfg_scales):
            raise ConfigError(f"cfg_scales: must be >= 0, got {self.cfg_scales}")
        for name in ("eval_prompts", "fd_samples", "eval_captions", "joint_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size: must be >= 1")

    def generation_eval(self) -> GenerationEval:
        scale = self.sampling.cfg_scale
        return GenerationEval(self.cfg_scales, scale, self.eval_prompts, self.fd_samples, self.seed)


class T2ITask(ImageSourcesTask):
    """MARS: next-token prediction over text and image codes (:class:`TextToImageLM`)."""

    model_config = T2IModelConfig
    data_config = T2IData
    options_config = T2IOptions
    sample_kind = "image-text"
    extra_sources = {"text_eval": "chat"}
    loss_unit = "tokens"

    def __init__(self, stage, ctx, model_cfg: T2IModelConfig, data_cfg: T2IData, options: T2IOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        init_dir = ctx.resolve_init(stage.init_from)
        if init_dir is not None:
            if not is_t2i_folder(init_dir):
                raise ConfigError(
                    f"init_from: {init_dir} is not a mars_t2i output; name the LM as model.lm.path"
                )
            if model_cfg.lm is not None or model_cfg.vq is not None:
                raise ConfigError(
                    "model: init_from provides the LM and the tokenizer; remove model.lm / model.vq"
                )
            self.model = TextToImageLM.load(init_dir, experts=model_cfg.experts)
            self.tokenizer = load_tokenizer(CausalLMConfig(), init_dir / "lm")
            self.vq = VQImageTokenizer.from_pretrained(init_dir / "vq")
        else:
            if model_cfg.lm is None or model_cfg.vq is None:
                raise ConfigError("model: set model.lm and model.vq (or init_from an earlier mars_t2i stage)")
            lm_cfg = model_cfg.lm
            if lm_cfg.path is not None:
                lm_cfg = CausalLMConfig(
                    **{**asdict(lm_cfg), "path": str(ctx.resolve_init(lm_cfg.path, "model.lm.path"))}
                )
            lm, self.tokenizer = load_causal_lm(lm_cfg)
            self.vq = VQImageTokenizer.from_pretrained(ctx.resolve_init(model_cfg.vq, "model.vq"))
            rows = lm.get_input_embeddings().num_embeddings
            layout = T2ILayout(rows, self.vq.codebook_size, model_cfg.experts, list(model_cfg.expert_modules))
            self.model = TextToImageLM(lm, layout)
        self.vq.requires_grad_(False).eval()
        downsample = self.vq.config.downsample
        check_sizes([data_cfg.image_size], downsample, "data.image_size")
        self.n_codes = (data_cfg.image_size // downsample) ** 2
        self.template = resolve_template(data_cfg.template, self.tokenizer)
        self.builder = SequenceBuilder(
            self.tokenizer, self.template, self.model.boi, self.model.eoi, self.n_codes, options.instructions
        )
        # (split, image index) -> its codes [n]; the tokenizer is frozen, so each image is tokenised once
        self._codes: dict[tuple[str, int], Tensor] = {}

    # -- data ----------------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        o = self.options
        return T2IDataset(self.source("train"), True, o.directions, o.cfg_dropout)

    def eval_dataset(self) -> Dataset | None:
        source = self.source("eval")
        return T2IDataset(source, False, self.options.directions, 0.0) if len(source) else None

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        sequences = [self.builder.build(s["direction"], s["caption"], s["drop"]) for s in samples]
        for s, seq in zip(samples, sequences, strict=True):
            if len(seq.ids) > self.data_cfg.max_length:
                raise ConfigError(
                    f"data.max_length: a {s['direction']} sequence of image {s['index']} has "
                    f"{len(seq.ids)} tokens (> {self.data_cfg.max_length}); raise data.max_length"
                )
        batch = pad_sequences(sequences, self.tokenizer.pad_token_id)
        batch["index"] = torch.tensor([s["index"] for s in samples])
        batch["images"] = fitted_uint8([s["image"] for s in samples], self.data_cfg.image_size)
        return batch

    def codes(self, split: str, index: Tensor, images: Tensor) -> Tensor:
        """Codes ``[B, n]`` of the batch's images, tokenised once per image (the tokenizer is frozen)."""
        missing = [i for i, k in enumerate(index.tolist()) if (split, k) not in self._codes]
        if missing:
            codes = self.vq.encode(pixels_from_uint8(images[missing])).flatten(1)
            for i, c in zip(missing, codes, strict=True):
                self._codes[(split, int(index[i]))] = c
        return torch.stack([self._codes[(split, k)] for k in index.tolist()])

    def loss_weight(self, batch: dict[str, Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        codes = self.codes("train" if self.training else "eval", batch["index"], batch["images"])
        v = self.model.text_vocab
        ids, labels = fill_codes(batch["ids"], codes, v), fill_codes(batch["labels"], codes, v)
        hidden, _ = self.model(ids, batch["attention_mask"])
        out = self.model.loss(hidden, labels)
        return {k: (t if k == "loss" else t.detach().float()) for k, t in out.items()}

    # -- evaluation ----------------------------------------------------------------------------------
    def _load_judge(self) -> SceneJudge | None:
        if self.options.judge is None:
            return None
        judge = SceneJudge.from_pretrained(self.ctx.resolve_init(self.options.judge, "options.judge"))
        return judge.to(next(self.model.parameters()).device).eval()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        metrics: dict[str, float] = {}
        source = self.source("eval")
        judge = self._load_judge()
        samples_dir = self.ctx.stage_dir / "samples"
        if len(source):
            metrics.update(self._consistency(source, judge, samples_dir))
            metrics.update(self._captions(source))
            metrics.update(self._joint(source, judge, samples_dir))
        metrics.update(self._perplexity())
        metrics["train_tflops"] = stage_training_tflops(self)
        return metrics

    def _consistency(self, source: ImageCaptions, judge: SceneJudge | None, out: Path) -> dict[str, float]:
        o = self.options

        def draw(prompts: list[str], scale: float, seed: int) -> np.ndarray:
            sampling = SamplingConfig(**{**vars(o.sampling), "cfg_scale": scale})
            batch = o.eval_batch_size
            return generate_images(self.model, self.vq, self.builder, prompts, sampling, seed, batch)

        return evaluate_generator(
            draw, source, judge, o.generation_eval(), self.data_cfg.image_size, self.ctx.stage_dir
        )

    def _captions(self, source: ImageCaptions) -> dict[str, float]:
        o, metrics = self.options, {}
        for lang, (indices, _) in sorted(eval_prompts(source, o.eval_captions).items()):
            images = fitted_uint8([source.image(i) for i in indices], self.data_cfg.image_size)
            codes = self.codes("eval", torch.tensor(indices), images)
            replies = generate_captions(
                self.model,
                self.builder,
                codes,
                [lang] * len(indices),
                self._stop_ids(),
                batch_size=o.eval_batch_size,
            )
            exact = [r in source.captions[i] for r, i in zip(replies, indices, strict=True)]
            metrics[f"caption_{lang}_exact"] = 100.0 * float(np.mean(exact)) if exact else 0.0
        return metrics

    def _joint(self, source: ImageCaptions, judge: SceneJudge | None, out: Path) -> dict[str, float]:
        o = self.options
        return evaluate_joint(
            self.model,
            self.vq,
            self.builder,
            source,
            judge,
            self._stop_ids(),
            o.sampling,
            o.seed,
            o.joint_samples,
            out,
        )

    def _stop_ids(self) -> set[int]:
        end = self.tokenizer.encode(self.template.end, add_special_tokens=False)
        return {*end, self.tokenizer.eos_token_id}

    def _perplexity(self) -> dict[str, float]:
        """Perplexity of the LM's text path on ``data.text_eval`` (whole conversations, every token), and
        of ``options.text_reference`` (the LM before MARS) when set."""
        chats = self._text_eval_chats()
        if not chats:
            return {}
        tokenized = [tokenize_chat(c, self.tokenizer, self.template, self.data_cfg.max_length) for c in chats]
        device = next(self.model.parameters()).device
        batches = [
            {
                k: v.to(device)
                for k, v in collate_chats(tokenized[s : s + 32], self.tokenizer.pad_token_id).items()
            }
            for s in range(0, len(tokenized), 32)
        ]
        after = text_nll(
            lambda ids, mask: self.model.lm.get_output_embeddings()(self.model(ids, mask)[0]), batches
        )
        metrics = {"text_ppl": math.exp(after), "text_eval_conversations": len(chats)}
        if self.options.text_reference is not None:
            from transformers import AutoModelForCausalLM

            reference = (
                AutoModelForCausalLM.from_pretrained(
                    self.ctx.resolve_init(self.options.text_reference, "options.text_reference")
                )
                .to(device)
                .eval()
            )
            before = text_nll(lambda ids, mask: reference(input_ids=ids, attention_mask=mask).logits, batches)
            metrics["text_ppl_before"] = math.exp(before)
        return metrics

    def _text_eval_chats(self) -> list:
        """The conversations of ``data.text_eval`` (chat sources)."""
        from mmfactory.data.sources import read_sources

        sources = self.data_cfg.text_eval
        if not sources:
            return []
        chats = read_sources(
            sources,
            "chat",
            self.counts,
            "text_eval",
            self.data_cfg.max_bad_fraction,
            self.stage.train.seed,
            False,
        )
        return [] if chats is None else chats.messages

    # -- output --------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: Path) -> None:
        """``lm/`` (+ tokenizer), ``vq/``, ``t2i.safetensors`` / ``t2i.json`` and ``mars_generation.json``:
        ``mmfactory generate --model DIR`` reads the folder."""
        self.model.save(out_dir)
        self.tokenizer.save_pretrained(out_dir / "lm")
        self.vq.save_pretrained(out_dir / "vq")
        meta = {
            "template": self.data_cfg.template,
            "image_size": self.data_cfg.image_size,
            "n_codes": self.n_codes,
            "instructions": asdict(self.options.instructions),
        }
        (out_dir / GENERATION_META).write_text(
            json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8"
        )
