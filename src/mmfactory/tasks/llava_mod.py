"""LLaVA-MoD (arXiv 2408.15881): distil a large multimodal LM into a small one, dense or sparse MoE.

Two tasks, both with a frozen teacher (a saved :class:`~mmfactory.models.mllm.MultimodalLM`, named by
``options.teacher``: an earlier stage or a folder) and a student that starts ``init_from`` an earlier stage
(or from parts, like ``mllm_sft``):

* ``mllm_mimic_distill``: the student imitates the teacher's next-token distributions on response tokens.
  ``options.upcycle`` turns the student's LM into a sparse MoE as the stage starts (dense-to-sparse mimic).
  Loss, with ``D`` the divergence over response tokens (forward KL at temperature 1 by default):
  ``kd_only``: ``kd_weight * D``; ``kd_lm``: ``kd_weight * D + lm_weight * CE``; both plus, once,
  ``moe_aux_weight * load_balancing + router_z_weight * router_z``. With ``options.teacher_topk: K`` the
  teacher's top-K log-probs are computed once and stored on disk (:mod:`mmfactory.data.teacher_logits`);
  training then reads them and never loads the teacher (forward KL only).
* ``mllm_preference_distill``: DPO (sigmoid) or KTO-pair with the **teacher as the reference model**,
  sequence log-probs summed over reply tokens, plus the MoE aux losses of chosen and rejected (added).
  Pairs come from ``preference`` sources (the world's faithful vs hallucinated descriptions and answers
  of an image, or preference JSONL with images), or are sampled on-policy and judged.

Teacher and student must share the tokenizer (the same token ids, the same logit width) and see the same
image tokens; the tasks check it and say which differs. The teacher is frozen and stays in eval mode.
Evaluation is :mod:`mmfactory.eval.mllm` (VQA, POPE, captions with CHAIR, parameters, tokens/s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import AutoTokenizer

from mmfactory.config import ConfigError
from mmfactory.data.chat import IGNORE_INDEX, TemplateName
from mmfactory.data.multimodal import MultimodalProcessor, MultimodalSample
from mmfactory.data.preference import preference_pairs
from mmfactory.data.sources import SourceConfig, check_fraction, read_sources
from mmfactory.data.streaming import TrainStream
from mmfactory.data.teacher_logits import TeacherTopK, fingerprint, open_teacher_topk, write_teacher_topk
from mmfactory.data.world_source import world_object_mentions
from mmfactory.eval.metrics import normalize_answer
from mmfactory.eval.mllm import generate_replies
from mmfactory.losses.distill import forward_kl, forward_kl_topk, generalized_jsd, reverse_kl, teacher_topk
from mmfactory.losses.moe_aux import moe_aux_losses
from mmfactory.losses.preference import sequence_logprobs
from mmfactory.models.components.moe import upcycle
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.mllm import MultimodalLM
from mmfactory.models.vision import load_image_processor
from mmfactory.tasks.mllm import MultimodalSFTOptions, MultimodalSFTTask
from mmfactory.tasks.preference import DPOOptions, preference_objective

LAYER_SELECTIONS = ("sparse", "first_half", "second_half", "dense")


@dataclass
class UpcycleOptions:
    """Sparse upcycling of the student's LM (:func:`~mmfactory.models.components.moe.upcycle`); LLaVA-MoD's
    defaults: 4 experts, top-2, MoE in every other layer from 0, dropless (``capacity_factor: null``)."""

    num_experts: int = 4
    top_k: int = 2
    layers: str | list[int] = "sparse"  # sparse | first_half | second_half | dense | explicit indices
    normalize_topk: bool = True
    capacity_factor: float | None = None
    min_capacity: int = 4
    router_jitter: float = 0.0
    capacity_renormalize: bool = True  # DeepSpeed renormalises a token's surviving gates after drops
    router_fp32: bool = True  # DeepSpeed keeps the gate in float32

    def validate(self) -> None:
        if isinstance(self.layers, str) and self.layers not in LAYER_SELECTIONS:
            raise ConfigError(f"layers: expected one of {list(LAYER_SELECTIONS)} or layer indices")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k: must be in [1, num_experts={self.num_experts}], got {self.top_k}")


@dataclass
class MoELossWeights:
    """Weights of the router losses (summed over MoE layers); LLaVA-MoD uses 0.01 load balancing."""

    moe_aux_weight: float = 0.01
    router_z_weight: float = 0.0


@dataclass
class MimicDistillOptions(MoELossWeights, MultimodalSFTOptions):
    """The mimic loss (module docstring), the teacher, upcycling, precomputed teacher top-k."""

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
    teacher_topk_dir: str | None = None  # default: the stage folder's teacher_topk/
    teacher_topk_batch_size: int = 32

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
class PreferenceDistillOptions(MoELossWeights, DPOOptions, MultimodalSFTOptions):
    """DPO / KTO-pair (:class:`~mmfactory.tasks.preference.DPOOptions`) against the teacher, MoE router
    losses, and the end-of-stage benchmarks."""

    teacher: str | None = None

    def validate(self) -> None:
        DPOOptions.validate(self)
        if self.teacher is None:
            raise ConfigError("teacher: name the reference teacher (an earlier stage or a folder)")
        if self.loss_reduction != "token":
            raise ConfigError("loss_reduction: preference losses are per pair; remove the setting")


@dataclass
class OnPolicySampling:
    """On-policy pairs (RLAIF-V style): the student as the stage starts samples ``samples_per_prompt``
    replies at ``temperature`` to each single-turn prompt of ``data.prompts`` (``image-chat`` sources whose
    assistant turn is the ground truth); each reply is judged against it (:func:`judge_reply`). The
    rejected reply is the worst; the chosen one the best if it is perfect, else the ground truth. Prompts
    whose replies are all perfect give no pair (counted as ``train/skipped_all_correct``)."""

    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError(
                f"samples_per_prompt: at least 2 replies are needed, got {self.samples_per_prompt}"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0 to sample, got {self.temperature}")


@dataclass
class MultimodalPreferenceDataConfig:
    """Image preference pairs from any ``preference`` sources (:mod:`mmfactory.data.sources`): the world
    (``kind: preference``: faithful vs hallucinated detailed descriptions — a wrong attribute or an extra
    object — and correct vs wrong short answers) or preference JSONL with images (the prompt holding
    ``<image>``). With ``on_policy`` set the training pairs are sampled instead (:class:`OnPolicySampling`)
    from the ``prompts`` sources; evaluation still reads the ``eval`` pairs."""

    train: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="preference", size=2000)]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="preference", split="val", size=100)]
    )
    on_policy: OnPolicySampling | None = None
    prompts: list[SourceConfig] = field(default_factory=list)  # image-chat prompts for on_policy
    max_bad_fraction: float | None = None
    max_length: int = 192
    template: TemplateName = "chatml"
    pad_square: bool = True
    pad_to_multiple_of: int | None = None

    def validate(self) -> None:
        check_fraction(self.max_bad_fraction)
        if self.on_policy is not None and not self.prompts:
            raise ConfigError("prompts: on_policy sampling needs image-chat prompt sources")
        if self.on_policy is None and self.prompts:
            raise ConfigError("prompts: only read with on_policy sampling; set on_policy or drop prompts")
        if self.on_policy is None and not self.train:
            raise ConfigError("train: at least one source is required")


def judge_reply(reply: str, truth: str, mentions: Callable[[str], list[str]]) -> float:
    """Score in [0, 1] of a sampled reply against the ground truth. A truth naming objects (by
    ``mentions``) is a description: the F1 of the objects the reply names (every mention of an absent
    object lowers precision) against those of the truth; any other truth is a short answer: exact match
    after VQA normalisation."""
    present = set(mentions(truth))
    if not present:
        return float(normalize_answer(reply) == normalize_answer(truth))
    said = mentions(reply)
    if not said:
        return 0.0
    precision = sum(obj in present for obj in said) / len(said)
    recall = len(set(said) & present) / len(present)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def load_teacher(folder: Path, student: MultimodalLM, processor: MultimodalProcessor) -> MultimodalLM:
    """The frozen teacher saved in ``folder`` (eval mode, no gradients), after checking that it shares the
    student's vocabulary, logit width and image tokens."""
    teacher = MultimodalLM.from_pretrained(folder, dtype=student.dtype)
    teacher.requires_grad_(False).eval()
    vocab, student_vocab = AutoTokenizer.from_pretrained(folder).get_vocab(), processor.tokenizer.get_vocab()
    if vocab != student_vocab:
        raise ConfigError(
            f"options.teacher: the teacher's tokenizer ({folder}, {len(vocab)} tokens) differs from the "
            f"student's ({len(student_vocab)} tokens; {len(vocab.keys() ^ student_vocab.keys())} tokens in "
            "one only): distillation compares distributions over the same token ids, so build the student "
            "with the teacher's tokenizer"
        )
    widths = [
        m.get_output_embeddings().weight.shape[0] for m in (teacher.language_model, student.language_model)
    ]
    if widths[0] != widths[1]:
        raise ConfigError(
            f"options.teacher: the teacher's LM predicts {widths[0]} logits, the student's {widths[1]}"
        )
    image_processor = load_image_processor(folder, teacher.config.vision_config.image_size)
    if (teacher.config.num_image_tokens, image_processor.to_dict()) != (
        student.config.num_image_tokens,
        processor.image_processor.to_dict(),
    ):
        raise ConfigError(
            f"options.teacher: the teacher sees images as {teacher.config.num_image_tokens} tokens through "
            f"its image processor, the student as {student.config.num_image_tokens}: the two must read the "
            "same inputs (use the teacher's vision tower and image size for the student)"
        )
    return teacher


class WithTeacherTopK(Dataset):
    """Items of ``dataset`` paired with their stored teacher top-k rows."""

    def __init__(self, dataset: Dataset, cache: TeacherTopK):
        if len(cache) != len(dataset):
            raise ValueError(f"the teacher cache holds {len(cache)} samples for a dataset of {len(dataset)}")
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[MultimodalSample, torch.Tensor, torch.Tensor]:
        return (self.dataset[index], *self.cache[index])


class MimicDistillTask(MultimodalSFTTask):
    """``mllm_mimic_distill`` (module docstring)."""

    options_config = MimicDistillOptions

    def __init__(self, stage, ctx, model_cfg, data_cfg, options: MimicDistillOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        if options.upcycle is not None:
            up = options.upcycle
            upcycle(
                self.model.language_model,
                up.num_experts,
                up.top_k,
                up.layers,
                normalize_topk=up.normalize_topk,
                capacity_factor=up.capacity_factor,
                min_capacity=up.min_capacity,
                router_jitter=up.router_jitter,
                capacity_renormalize=up.capacity_renormalize,
                router_fp32=up.router_fp32,
            )
        self.teacher: MultimodalLM | None = None
        self.teacher_dir = ctx.resolve_init(options.teacher, "options.teacher")
        if options.teacher_topk is None:  # the stored top-k replaces the teacher in training
            self.teacher = load_teacher(self.teacher_dir, self.model, self.processor)

    def train(self, mode: bool = True) -> MimicDistillTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no dropout, whatever the loop asks of the student
        return self

    # -- data ----------------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        dataset = super().train_dataset()
        if self.options.teacher_topk is None:
            return dataset
        if isinstance(dataset, TrainStream):
            raise ConfigError(
                "options.teacher_topk: the stored top-k is indexed by sample and a streamed source has no "
                "index; stream with the online teacher (teacher_topk: null) or read the source up front"
            )
        return WithTeacherTopK(dataset, self._teacher_cache(dataset))

    def eval_dataset(self) -> Dataset | None:
        """Held-out loss batches need the teacher: none when training from its stored top-k."""
        return super().eval_dataset() if self.teacher is not None else None

    def _teacher_cache(self, dataset) -> TeacherTopK:
        """Open the stored top-k of ``dataset``, computing it first (on the main process) if absent."""
        k = self.options.teacher_topk
        folder = Path(self.options.teacher_topk_dir or self.ctx.stage_dir / "teacher_topk")
        weights = self.teacher_dir / "model.safetensors"
        stamp = f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights.is_file() else ""
        samples = (ids for s in dataset.samples for ids in (s[1].input_ids, s[1].labels))
        key = fingerprint([str(self.teacher_dir.resolve()), stamp, str(k), repr(self.data_cfg), *samples])
        if self.ctx.is_main_process and open_teacher_topk(folder, k, key) is None:
            self._write_teacher_cache(dataset, folder, k, key)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return open_teacher_topk(folder, k, key)

    @torch.no_grad()
    def _write_teacher_cache(self, dataset, folder: Path, k: int, key: str) -> None:
        teacher = load_teacher(self.teacher_dir, self.model, self.processor)
        if torch.cuda.is_available():
            teacher.to(torch.device("cuda", torch.cuda.current_device()))

        def topk_of_batch(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
            batch = {
                name: t.to(teacher.device) for name, t in self.collate([dataset[i] for i in indices]).items()
            }
            logprobs, ids = teacher_topk(self.response_logits(teacher, batch), k)  # [N, k] each
            rows = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
            return logprobs.cpu(), ids.cpu(), rows

        size = self.options.teacher_topk_batch_size
        batches = (list(range(lo, min(lo + size, len(dataset)))) for lo in range(0, len(dataset), size))
        write_teacher_topk(folder, batches, topk_of_batch, k, key)

    def collate(self, samples: list) -> dict[str, torch.Tensor]:
        if not samples or isinstance(samples[0], MultimodalSample):
            return super().collate(samples)
        batch = super().collate([s[0] for s in samples])
        batch["teacher_logprobs"] = torch.cat([s[1] for s in samples])  # [N, K]
        batch["teacher_indices"] = torch.cat([s[2] for s in samples])
        return batch

    # -- math ----------------------------------------------------------------------------------------
    def distillation_loss(self, batch: dict[str, torch.Tensor], student_logits: torch.Tensor) -> torch.Tensor:
        """The divergence between student ``[N, V]`` and teacher at the same response positions."""
        o = self.options
        everything = torch.ones(1, len(student_logits), dtype=torch.bool, device=student_logits.device)
        scale = {"temperature": o.temperature, "scale_by_temperature_squared": o.scale_by_temperature_squared}
        if "teacher_logprobs" in batch:
            stored = batch["teacher_logprobs"]
            if len(stored) != len(student_logits):
                raise ValueError(
                    f"the stored teacher top-k has {len(stored)} rows for {len(student_logits)} response "
                    "tokens: the cache does not match this data; delete it"
                )
            return forward_kl_topk(
                student_logits[None], stored[None], batch["teacher_indices"][None], everything, **scale
            )
        with torch.no_grad():
            teacher_logits = self.response_logits(self.teacher, batch)
        if o.divergence == "forward_kl":
            return forward_kl(student_logits[None], teacher_logits[None], everything, **scale)
        if o.divergence == "reverse_kl":
            return reverse_kl(student_logits[None], teacher_logits[None], everything, **scale)
        return generalized_jsd(
            student_logits[None], teacher_logits[None], everything, beta=o.jsd_beta, **scale
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        o = self.options
        targets = batch["labels"][:, 1:]
        student_logits = self.response_logits(self.model, batch)  # [N, V]
        kd = self.distillation_loss(batch, student_logits)
        ce = torch.nn.functional.cross_entropy(student_logits.float(), targets[targets != IGNORE_INDEX])
        aux = moe_aux_losses(self.model.language_model, batch["attention_mask"])
        loss = (
            o.kd_weight * kd + o.moe_aux_weight * aux["load_balancing"] + o.router_z_weight * aux["router_z"]
        )
        if o.mode == "kd_lm":
            loss = loss + o.lm_weight * ce
        return {
            "loss": loss,
            "kd": kd.detach(),
            "ce": ce.detach(),
            "load_balancing": aux["load_balancing"].detach(),
        }


class PreferenceDistillTask(MultimodalSFTTask):
    """``mllm_preference_distill`` (module docstring). Batches hold the ``B`` chosen rows then the ``B``
    rejected rows (``[2B, T]``) and each pair's image twice (``pixel_values [2B, 3, S, S]``)."""

    sample_kind = "preference"
    extra_sources = {"prompts": "image-chat"}
    data_config = MultimodalPreferenceDataConfig
    options_config = PreferenceDistillOptions
    loss_unit = "pairs"

    def __init__(self, stage, ctx, model_cfg, data_cfg, options: PreferenceDistillOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.teacher = load_teacher(
            ctx.resolve_init(options.teacher, "options.teacher"), self.model, self.processor
        )
        self._pairs: dict[str, list[tuple[MultimodalSample, MultimodalSample]]] = {}

    def train(self, mode: bool = True) -> PreferenceDistillTask:
        super().train(mode)
        self.teacher.eval()
        return self

    # -- data ----------------------------------------------------------------------------------------
    def pairs(self, split: str) -> list[dict]:
        """``[{"prompt", "chosen", "rejected", "image"}]`` of ``split`` (``train`` or ``eval``)."""
        if split == "train" and self.data_cfg.on_policy is not None:
            return self.sampled_pairs()
        samples = self.read_sources(split, self.counts)
        return [] if samples is None else preference_pairs(samples, f"data.{split}", images=True)

    @torch.no_grad()
    def sampled_pairs(self) -> list[dict]:
        """On-policy training pairs (:class:`OnPolicySampling`) from the single-turn ``data.prompts``."""
        cfg, sampling = self.data_cfg, self.data_cfg.on_policy
        prompts = read_sources(
            cfg.prompts,
            "image-chat",
            self.counts,
            "prompts",
            cfg.max_bad_fraction,
            report=self.ctx.is_main_process,
        )
        conversations, truths, images = [], [], []
        for i, messages in enumerate(prompts.messages):
            if len(messages) != 2 or [m["role"] for m in messages] != ["user", "assistant"]:
                raise ConfigError(f"data.prompts: conversation {i} is not one user turn and its answer")
            conversations.append(messages[:1])
            truths.append(messages[1]["content"])
            images.append(prompts.images(i))
        gen = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=True,
            temperature=sampling.temperature,
            batch_size=self.options.eval_batch_size,
        )
        torch.manual_seed(sampling.seed)
        was_training = self.model.training
        replies = [
            generate_replies(self.model, self.processor, conversations, images, gen)
            for _ in range(sampling.samples_per_prompt)
        ]
        self.model.train(was_training)

        pairs = []
        for i, truth in enumerate(truths):
            candidates = [r[i] for r in replies]
            scores = [judge_reply(c, truth, world_object_mentions) for c in candidates]
            worst, best = (
                min(range(len(scores)), key=scores.__getitem__),
                max(range(len(scores)), key=scores.__getitem__),
            )
            if scores[worst] == 1.0:
                self.counts["train/skipped_all_correct"] += 1
                continue
            chosen = candidates[best] if scores[best] == 1.0 else truth
            prompt = conversations[i][0]["content"]
            pairs.append(
                {"prompt": prompt, "chosen": chosen, "rejected": candidates[worst], "image": images[i][0]}
            )
        self.counts["train/sampled_replies"] = len(truths) * sampling.samples_per_prompt
        return pairs

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
        return super().collate([s[0] for s in samples] + [s[1] for s in samples])

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
        result = preference_objective(o, policy_logps, reference_logps, num_tokens)
        result["loss"] = (
            result["loss"] + o.moe_aux_weight * aux["load_balancing"] + o.router_z_weight * aux["router_z"]
        )
        result["load_balancing"] = aux["load_balancing"].detach()
        return result

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2
