"""The teacher signal of LLaVA-MoD's mimic distillation, chosen once per stage: the frozen teacher run online
(:class:`OnlineTeacher`) or its top-K log-probs stored on disk by the stage's prepare step
(:class:`StoredTopK`). Both give the task the same three things: the training samples, their collation
and the divergence between student and teacher at the response positions.

The stored top-k is an artifact (:mod:`mmfactory.artifacts`) whose files are those of
:mod:`mmfactory.data.teacher_logits`; its fingerprint (:func:`topk_fingerprint`) names the teacher, ``k``,
the data config and the tokenised samples, and the tokenizer's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import AutoTokenizer

from mmfactory.artifacts import check_artifact, fingerprint_digest, prepare_artifact
from mmfactory.config import ConfigError
from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.data.multimodal import MultimodalProcessor, MultimodalSample
from mmfactory.data.streaming import TrainStream
from mmfactory.data.teacher_logits import TeacherTopK, fingerprint, write_teacher_topk
from mmfactory.losses.distill import forward_kl, forward_kl_topk, generalized_jsd, reverse_kl, teacher_topk
from mmfactory.models.mllm import MultimodalLM
from mmfactory.models.vision import load_image_processor

Collate = Callable[[list[MultimodalSample]], dict[str, Tensor]]
ResponseLogits = Callable[[MultimodalLM, dict[str, Tensor]], Tensor]  # (model, batch) -> [N, V]


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


def vocab_digest(tokenizer) -> str:
    """SHA-256 of the tokenizer's vocabulary (token -> id), for fingerprints."""
    text = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def topk_fingerprint(teacher: str, k: int, data: dict[str, Any], tokenizer: str) -> dict[str, Any]:
    """What a stored top-k is made from, but for its samples (:func:`samples_digest`, added once the data
    is read): the teacher's fingerprint (its stage's, or its files'), ``k``, the stage's data config and the
    tokenizer's vocabulary digest."""
    return {"artifact": "teacher_topk", "teacher": teacher, "k": k, "data": data, "tokenizer": tokenizer}


def samples_digest(dataset) -> str:
    """SHA-256 over the token ids and labels of every tokenised sample of a
    :class:`~mmfactory.data.multimodal.MultimodalChatDataset`, in order."""
    return fingerprint(ids for _, chat in dataset.samples for ids in (chat.input_ids, chat.labels))


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


@dataclass
class DivergenceOptions:
    """How student and teacher distributions are compared (the task's ``divergence`` options)."""

    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    jsd_beta: float = 0.5
    temperature: float = 1.0
    scale_by_temperature_squared: bool = False

    @property
    def scale(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "scale_by_temperature_squared": self.scale_by_temperature_squared,
        }


class OnlineTeacher:
    """The frozen ``teacher`` runs on every batch beside the student (every divergence; held-out loss too)."""

    def __init__(
        self, teacher: MultimodalLM, response_logits: ResponseLogits, collate: Collate, d: DivergenceOptions
    ):
        self.teacher, self.response_logits, self.collate_chats, self.d = teacher, response_logits, collate, d

    def prepare(self, accelerator, dataset: Dataset) -> None:
        """Nothing to prepare: the teacher is in memory."""

    def train_dataset(self, dataset: Dataset) -> Dataset:
        return dataset

    def collate(self, samples: list[MultimodalSample]) -> dict[str, Tensor]:
        return self.collate_chats(samples)

    def divergence(self, batch: dict[str, Tensor], student_logits: Tensor) -> Tensor:
        """The divergence between the student's ``[N, V]`` response logits and the teacher's."""
        everything = torch.ones(1, len(student_logits), dtype=torch.bool, device=student_logits.device)
        with torch.no_grad():
            teacher_logits = self.response_logits(self.teacher, batch)
        d = self.d
        if d.divergence == "forward_kl":
            return forward_kl(student_logits[None], teacher_logits[None], everything, **d.scale)
        if d.divergence == "reverse_kl":
            return reverse_kl(student_logits[None], teacher_logits[None], everything, **d.scale)
        return generalized_jsd(
            student_logits[None], teacher_logits[None], everything, beta=d.jsd_beta, **d.scale
        )


@dataclass
class TopKBuild:
    """How the stage's prepare step computes the stored top-k: the teacher (loaded then, on the main
    process, beside the student), run on batches of ``batch_size`` training samples as the student is."""

    load_teacher: Callable[[], MultimodalLM]
    response_logits: ResponseLogits
    batch_size: int


class StoredTopK:
    """The teacher as its top-``k`` log-probs at each response position, computed once by :meth:`prepare`
    into the artifact ``folder`` and read while training: the teacher is never in memory then, and the
    divergence is the forward KL over the stored top-k (:func:`~mmfactory.losses.distill.forward_kl_topk`).

    ``fingerprint`` holds the fields of :func:`topk_fingerprint` but ``samples`` (known once the data is
    read); ``build`` None: ``folder`` is another stage's artifact, read but never written.
    """

    teacher = None

    def __init__(
        self,
        k: int,
        folder: Path,
        fingerprint: dict[str, Any],
        build: TopKBuild | None,
        collate: Collate,
        d: DivergenceOptions,
        fix: str | None = None,
    ):
        self.k, self.folder, self.fingerprint, self.build = k, Path(folder), fingerprint, build
        self.collate_chats, self.d, self.fix = collate, d, fix
        self.cache: TeacherTopK | None = None

    def prepare(self, accelerator, dataset: Dataset) -> None:
        """Reuse, refuse or compute (main process, progress bar) the stored top-k of ``dataset``."""
        if isinstance(dataset, TrainStream):
            raise ConfigError(
                "options.teacher_topk: the stored top-k is indexed by sample and a streamed source has no "
                "index; stream with the online teacher (teacher_topk: null) or read the source up front"
            )
        key = {**self.fingerprint, "samples": samples_digest(dataset)}
        if self.build is None:  # another stage's: read, never written
            if not check_artifact(self.folder, key, self.fix):
                raise FileNotFoundError(f"{self.folder}: no stored teacher top-k there")
        else:
            prepare_artifact(
                accelerator,
                self.folder,
                key,
                lambda tmp, bar: self._write(tmp, bar, dataset, fingerprint_digest(key)),
                total=len(dataset),
                desc=f"teacher top-{self.k}",
                fix=self.fix,
            )
        self.cache = TeacherTopK(self.folder)

    @torch.no_grad()
    def _write(self, tmp: Path, bar, dataset: Dataset, digest: str) -> None:
        build, k = self.build, self.k
        teacher = build.load_teacher()

        def topk_of_batch(indices: list[int]) -> tuple[Tensor, Tensor, list[int]]:
            batch = {
                n: t.to(teacher.device) for n, t in self.collate_chats([dataset[i] for i in indices]).items()
            }
            logprobs, ids = teacher_topk(build.response_logits(teacher, batch), k)  # [N, k] each
            rows = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
            bar.update(len(indices))
            return logprobs.cpu(), ids.cpu(), rows

        size = build.batch_size
        batches = (list(range(lo, min(lo + size, len(dataset)))) for lo in range(0, len(dataset), size))
        write_teacher_topk(tmp, batches, topk_of_batch, k, digest)

    def train_dataset(self, dataset: Dataset) -> Dataset:
        if self.cache is None:
            raise RuntimeError("the stored teacher top-k is read before the stage's prepare step made it")
        return WithTeacherTopK(dataset, self.cache)

    def collate(self, samples: list[tuple[MultimodalSample, Tensor, Tensor]]) -> dict[str, Tensor]:
        batch = self.collate_chats([s[0] for s in samples])
        batch["teacher_logprobs"] = torch.cat([s[1] for s in samples])  # [N, K]
        batch["teacher_indices"] = torch.cat([s[2] for s in samples])
        return batch

    def divergence(self, batch: dict[str, Tensor], student_logits: Tensor) -> Tensor:
        """Forward KL of the student's ``[N, V]`` response logits from the stored top-k rows."""
        stored = batch["teacher_logprobs"]
        if len(stored) != len(student_logits):
            raise ValueError(
                f"the stored teacher top-k has {len(stored)} rows for {len(student_logits)} response "
                "tokens: the cache does not match this data; delete it"
            )
        everything = torch.ones(1, len(student_logits), dtype=torch.bool, device=student_logits.device)
        return forward_kl_topk(
            student_logits[None], stored[None], batch["teacher_indices"][None], everything, **self.d.scale
        )
