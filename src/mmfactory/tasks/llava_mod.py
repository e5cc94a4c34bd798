"""LLaVA-MoD (arXiv 2408.15881): distil a large multimodal LM into a small one, dense or sparse MoE.

Two tasks, both with a frozen teacher (a saved :class:`~mmfactory.models.mllm.MultimodalLM`, named by
``options.teacher``: an earlier stage or a folder) and a student that starts ``init_from`` an earlier stage
(or from parts, like ``mllm_sft``):

* ``mllm_mimic_distill``: the student imitates the teacher's next-token distributions on response tokens.
  ``options.upcycle`` turns the student's LM into a sparse MoE as the stage starts (dense-to-sparse mimic).
  Loss, with ``D`` the divergence over response tokens (forward KL at temperature 1 by default):
  ``kd_only``: ``kd_weight * D``; ``kd_lm``: ``kd_weight * D + lm_weight * CE``; both plus, once,
  ``moe.aux_weight * load_balancing + moe.router_z_weight * router_z``. The teacher signal is chosen once
  (:mod:`mmfactory.llava_mod.teacher`): the teacher online, or with ``options.teacher_topk: K`` its top-K
  log-probs, computed by the stage's prepare step into the artifact ``teacher_topk/`` and read while
  training, which never loads the teacher then (forward KL only).
* ``mllm_preference_distill``: DPO (sigmoid) or KTO-pair with the **teacher as the reference model**,
  sequence log-probs summed over reply tokens, plus the MoE aux losses of chosen and rejected (added).
  Pairs come from ``preference`` sources (the world's faithful vs hallucinated descriptions and answers
  of an image, or preference JSONL with images), or are sampled on-policy and judged by the stage's
  prepare step into the artifact ``on_policy_pairs/`` (:mod:`mmfactory.llava_mod.on_policy`).

Teacher and student must share the tokenizer (the same token ids, the same logit width) and see the same
image tokens; the tasks check it and say which differs. The teacher is frozen and stays in eval mode.
Evaluation is :mod:`mmfactory.eval.mllm` (VQA, POPE, captions with CHAIR, parameters, tokens/s).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from mmfactory.artifacts import prepare_artifact, recorded_fingerprint
from mmfactory.config import ConfigError, to_dict
from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.data.multimodal import MultimodalSample
from mmfactory.data.preference import preference_pairs
from mmfactory.data.sources import read_sources
from mmfactory.data.world_source import world_object_mentions
from mmfactory.llava_mod.config import MoELossOptions, MultimodalPreferenceDataConfig, UpcycleOptions
from mmfactory.llava_mod.on_policy import (
    pairs_fingerprint,
    read_pairs,
    sample_pairs,
    single_turn,
    write_pairs,
)
from mmfactory.llava_mod.teacher import (
    DivergenceOptions,
    OnlineTeacher,
    StoredTopK,
    TopKBuild,
    load_teacher,
    topk_fingerprint,
    vocab_digest,
)
from mmfactory.losses.moe_aux import moe_aux_losses
from mmfactory.losses.preference import sequence_logprobs
from mmfactory.models.components.moe import upcycle
from mmfactory.models.lora import LoraOptions
from mmfactory.models.mllm import MultimodalLM, MultimodalLMSpec
from mmfactory.tasks.base import TrainingTask
from mmfactory.tasks.mllm import (
    LossReduction,
    MLLMEvalOptions,
    MultimodalSFTTask,
    load_multimodal_lm,
    response_logits,
    run_benchmarks,
    save_multimodal_lm,
    vision_lr_scale,
)
from mmfactory.tasks.preference import DPOOptions, preference_objective


@dataclass
class MimicDistillOptions:
    """The mimic loss (module docstring), the teacher, upcycling and the precomputed teacher top-k; the
    groups ``moe:`` (router losses), ``lora:`` and ``eval:`` (benchmarks, as ``mllm_sft``'s)."""

    teacher: str | None = None  # an earlier stage or a folder with a saved MultimodalLM
    mode: Literal["kd_only", "kd_lm"] = "kd_lm"
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    scale_by_temperature_squared: bool = False
    kd_weight: float = 1.0
    lm_weight: float = 1.0  # kd_lm only
    upcycle: UpcycleOptions | None = None
    teacher_topk: int | None = None  # K: distil from the teacher's top-K log-probs stored on disk
    teacher_topk_dir: str | None = None  # folder, or earlier stage (its teacher_topk/); default: this stage's
    teacher_topk_batch_size: int = 32
    moe: MoELossOptions = field(default_factory=MoELossOptions)
    lora: LoraOptions | None = None
    loss_reduction: LossReduction = "token"  # the mimic loss averages over response tokens: token only
    vision_lr_scale: float = 1.0
    eval: MLLMEvalOptions = field(default_factory=MLLMEvalOptions)

    def validate(self) -> None:
        if self.teacher is None:
            raise ConfigError("teacher: name the teacher (an earlier stage or a saved MultimodalLM folder)")
        if self.loss_reduction != "token":
            raise ConfigError("loss_reduction: the mimic loss averages over tokens; remove the setting")
        if self.teacher_topk is not None and self.divergence != "forward_kl":
            raise ConfigError("teacher_topk: a stored top-k teacher supports the forward_kl divergence only")
        if self.teacher_topk is not None and self.teacher_topk < 1:
            raise ConfigError(f"teacher_topk: must be >= 1, got {self.teacher_topk}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")


@dataclass
class PreferenceDistillOptions:
    """The reference teacher and the groups ``dpo:`` (DPO / KTO-pair,
    :class:`~mmfactory.tasks.preference.DPOOptions`), ``moe:`` (router losses), ``lora:`` and ``eval:``."""

    teacher: str | None = None
    dpo: DPOOptions = field(default_factory=DPOOptions)
    moe: MoELossOptions = field(default_factory=MoELossOptions)
    lora: LoraOptions | None = None
    vision_lr_scale: float = 1.0
    eval: MLLMEvalOptions = field(default_factory=MLLMEvalOptions)

    def validate(self) -> None:
        if self.teacher is None:
            raise ConfigError("teacher: name the reference teacher (an earlier stage or a folder)")


class MimicDistillTask(MultimodalSFTTask):
    """``mllm_mimic_distill`` (module docstring)."""

    options_config = MimicDistillOptions

    def __init__(self, stage, ctx, model_cfg, data_cfg, options: MimicDistillOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        if options.upcycle is not None:  # UpcycleOptions' fields are upcycle()'s arguments
            upcycle(self.model.language_model, **asdict(options.upcycle))
        # The teacher signal, chosen once: the teacher online, or its top-k stored by prepare().
        self.teacher_dir = ctx.resolve_init(options.teacher, "options.teacher")
        divergence = DivergenceOptions(
            options.divergence, options.jsd_beta, options.temperature, options.scale_by_temperature_squared
        )
        chats = super().collate
        if options.teacher_topk is None:
            self.teacher = load_teacher(self.teacher_dir, self.model, self.processor)
            self.signal = OnlineTeacher(self.teacher, response_logits, chats, divergence)
        else:
            self.teacher = None  # never in memory while training
            self.signal = self._stored_topk(options.teacher_topk, chats, divergence)

    def _stored_topk(self, k: int, chats, divergence: DivergenceOptions) -> StoredTopK:
        """The stored top-k: this stage's artifact ``teacher_topk/``, the folder ``teacher_topk_dir``, or
        the ``teacher_topk`` artifact of the earlier stage ``teacher_topk_dir`` names (read, not written)."""
        where, build = self.options.teacher_topk_dir, None
        if where is not None and where in self.ctx.stage_outputs:
            folder = self.ctx.artifact("teacher_topk", stage=where)
            fix = "point options.teacher_topk_dir elsewhere, or drop it to compute the top-k in this stage"
        else:
            folder = self.ctx.artifact("teacher_topk") if where is None else Path(where)
            fix = None if where is None else f"delete {folder}, or point options.teacher_topk_dir elsewhere"
            build = TopKBuild(self.frozen_teacher, response_logits, self.options.teacher_topk_batch_size)
        teacher = self.ctx.fingerprint(self.options.teacher, "options.teacher")
        key = topk_fingerprint(teacher, k, to_dict(self.data_cfg), vocab_digest(self.processor.tokenizer))
        return StoredTopK(k, folder, key, build, chats, divergence, fix)

    def frozen_teacher(self) -> MultimodalLM:
        """The frozen teacher, checked against the student and placed on the student's device."""
        return load_teacher(self.teacher_dir, self.model, self.processor).to(self.model.device)

    def train(self, mode: bool = True) -> MimicDistillTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no dropout, whatever the loop asks of the student
        return self

    # -- preparation and data ------------------------------------------------------------------------
    def prepare(self, accelerator) -> None:
        self.signal.prepare(accelerator, super().train_dataset())

    def train_dataset(self) -> Dataset:
        return self.signal.train_dataset(super().train_dataset())

    def eval_dataset(self) -> Dataset | None:
        """Held-out loss batches need the teacher: none when training from its stored top-k."""
        return super().eval_dataset() if self.teacher is not None else None

    def collate(self, samples: list) -> dict[str, torch.Tensor]:
        return self.signal.collate(samples)

    # -- math ----------------------------------------------------------------------------------------
    def distillation_loss(self, batch: dict[str, torch.Tensor], student_logits: torch.Tensor) -> torch.Tensor:
        """The divergence between student ``[N, V]`` and teacher at the same response positions."""
        return self.signal.divergence(batch, student_logits)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        o = self.options
        targets = batch["labels"][:, 1:]
        student_logits = response_logits(self.model, batch)  # [N, V]
        kd = self.distillation_loss(batch, student_logits)
        ce = torch.nn.functional.cross_entropy(student_logits.float(), targets[targets != IGNORE_INDEX])
        aux = moe_aux_losses(self.model.language_model, batch["attention_mask"])
        loss = o.kd_weight * kd + o.moe.loss(aux)
        if o.mode == "kd_lm":
            loss = loss + o.lm_weight * ce
        return {
            "loss": loss,
            "kd": kd.detach(),
            "ce": ce.detach(),
            "load_balancing": aux["load_balancing"].detach(),
        }


class PreferenceDistillTask(TrainingTask):
    """``mllm_preference_distill`` (module docstring). Batches hold the ``B`` chosen rows then the ``B``
    rejected rows (``[2B, T]``) and each pair's image twice (``pixel_values [2B, 3, S, S]``). The policy is
    loaded, benchmarked and saved as ``mllm_sft``'s (:func:`~mmfactory.tasks.mllm.load_multimodal_lm`)."""

    model_config = MultimodalLMSpec
    sample_kind = "preference"
    extra_sources = {"prompts": "image-chat"}
    data_config = MultimodalPreferenceDataConfig
    options_config = PreferenceDistillOptions
    loss_unit = "pairs"

    def __init__(self, stage, ctx, model_cfg, data_cfg, options: PreferenceDistillOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.model, self.processor = load_multimodal_lm(stage, ctx, model_cfg, data_cfg, options.lora)
        self.teacher = load_teacher(
            ctx.resolve_init(options.teacher, "options.teacher"), self.model, self.processor
        )
        self.counts: Counter[str] = Counter()
        self._pairs: dict[str, list[tuple[MultimodalSample, MultimodalSample]]] = {}
        self._prompt_data = None

    def train(self, mode: bool = True) -> PreferenceDistillTask:
        super().train(mode)
        self.teacher.eval()
        return self

    # -- preparation and data ------------------------------------------------------------------------
    def prepare(self, accelerator) -> None:
        """With ``data.on_policy``: the student as the stage starts samples and judges the training pairs
        (:func:`~mmfactory.llava_mod.on_policy.sample_pairs`) into the artifact ``on_policy_pairs/``."""
        sampling = self.data_cfg.on_policy
        if sampling is None:
            return
        prompts = self._prompts()
        conversations, truths = single_turn(prompts)
        model_cfg, batch_size = self.model_cfg, self.options.eval.batch_size
        starts = [self.stage.init_from, model_cfg.vision.path, model_cfg.lm.path]
        key = pairs_fingerprint(
            {ref: self.ctx.fingerprint(ref) for ref in starts if ref is not None},
            to_dict(model_cfg),
            self.stage.train.seed,
            to_dict(sampling),
            batch_size,
            to_dict(self.data_cfg.prompts),
            conversations,
            truths,
            vocab_digest(self.processor.tokenizer),
        )

        def build(folder, bar) -> None:
            images = [prompts.images(i) for i in range(len(conversations))]
            args = (conversations, truths, images, sampling, batch_size, world_object_mentions, bar)
            write_pairs(folder, *sample_pairs(self.model, self.processor, *args))

        total = len(conversations) * sampling.samples_per_prompt
        prepare_artifact(
            accelerator, self.ctx.artifact("on_policy_pairs"), key, build, total, "on-policy pairs"
        )

    def _prompts(self):
        """The ``data.prompts`` conversations (read once; counted under ``prompts/``)."""
        if self._prompt_data is None:
            cfg, report = self.data_cfg, self.ctx.is_main_process
            self._prompt_data = read_sources(
                cfg.prompts, "image-chat", self.counts, "prompts", cfg.max_bad_fraction, report=report
            )
        return self._prompt_data

    def pairs(self, split: str) -> list[dict]:
        """``[{"prompt", "chosen", "rejected", "image"}]`` of ``split`` (``train`` or ``eval``); on-policy
        training pairs are those :meth:`prepare` sampled."""
        if split == "train" and self.data_cfg.on_policy is not None:
            folder = self.ctx.artifact("on_policy_pairs")
            if recorded_fingerprint(folder) is None:
                raise RuntimeError("on-policy pairs are read before the stage's prepare step sampled them")
            return read_pairs(folder, self._prompts().images, self.counts)
        samples = self.read_sources(split, self.counts)
        return [] if samples is None else preference_pairs(samples, f"data.{split}", images=True)

    def _tokenized(self, split: str) -> list[tuple[MultimodalSample, MultimodalSample]]:
        if split not in self._pairs:
            kept = []
            for pair in self.pairs(split):
                chats = [
                    self.processor.fit(
                        self.processor.tokenize(
                            [
                                {"role": "user", "content": pair["prompt"]},
                                {"role": "assistant", "content": pair[key]},
                            ]
                        ),
                        self.data_cfg.max_length,
                    )
                    for key in ("chosen", "rejected")
                ]
                if any(chat is None or not chat.has_targets for chat in chats):
                    self.counts[f"{split}/skipped_truncated_reply"] += 1
                    continue
                self.counts[f"{split}/truncated"] += chats[0].truncated or chats[1].truncated
                kept.append(
                    tuple(
                        MultimodalSample(c.input_ids, c.labels, c.truncated, [pair["image"]]) for c in chats
                    )
                )
            self.counts[f"{split}/pairs"] = len(kept)
            self._pairs[split] = kept
        return self._pairs[split]

    def train_dataset(self) -> list[tuple[MultimodalSample, MultimodalSample]]:
        return self._tokenized("train")

    def eval_dataset(self) -> list[tuple[MultimodalSample, MultimodalSample]] | None:
        return self._tokenized("eval") or None

    def collate(self, samples: list[tuple[MultimodalSample, MultimodalSample]]) -> dict[str, torch.Tensor]:
        rows = [s[0] for s in samples] + [s[1] for s in samples]
        return self.processor.collate(rows, self.data_cfg.pad_to_multiple_of)

    def data_report(self) -> dict[str, int]:
        return dict(self.counts)

    # -- math ----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        o = self.options
        inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        policy_logps, num_tokens = sequence_logprobs(self.model(*inputs).logits, batch["labels"])
        aux = moe_aux_losses(self.model.language_model, batch["attention_mask"], groups=2)
        with torch.no_grad():
            reference_logps = sequence_logprobs(self.teacher(*inputs).logits, batch["labels"])[0]
        result = preference_objective(o.dpo, policy_logps, reference_logps, num_tokens)
        result["loss"] = result["loss"] + o.moe.loss(aux)
        result["load_balancing"] = aux["load_balancing"].detach()
        return result

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def lr_scale(self, name: str) -> float:
        return vision_lr_scale(name, self.options.vision_lr_scale)

    # -- evaluation and output -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return run_benchmarks(self.model, self.processor, self.options.eval, self.ctx.stage_dir)

    def save_pretrained(self, out_dir: Path) -> None:
        self.model = save_multimodal_lm(self.model, self.processor, self.options.lora, out_dir)
