"""The contract between a stage's task (the math) and the one training loop (the machinery).

A task is an ``nn.Module`` that owns its model(s) — student, frozen teacher, reference, reward model — and
returns ``{"loss": scalar, **metrics}`` from ``forward(batch)``. The loop wraps the whole task with
accelerate (so DDP / FSDP / DeepSpeed see one module; frozen parts have ``requires_grad=False``) and never
names a method.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from mmfactory.artifacts import folder_stamp, recorded_fingerprint
from mmfactory.config import StageConfig
from mmfactory.models.hub import not_a_model_source, resolve_model_folder


@dataclass
class StageContext:
    """What a task may know about the run: where it writes and what earlier stages produced."""

    run_dir: Path
    stage_dir: Path
    stage_outputs: dict[str, Path] = field(default_factory=dict)  # earlier stage name -> its final/ dir
    is_main_process: bool = True
    # earlier stage name -> the fingerprint its DONE records (of its final/ files; mmfactory.lineage)
    stage_fingerprints: dict[str, str] = field(default_factory=dict)

    def resolve_init(self, init_from: str | None, what: str = "init_from") -> Path | None:
        """``init_from`` as a folder: an earlier stage's ``final/``, a local path or a hub id; ``what`` names
        the setting in the error."""
        if init_from is None:
            return None
        if init_from in self.stage_outputs:
            return self.stage_outputs[init_from]
        try:
            return resolve_model_folder(init_from, what)
        except FileNotFoundError:
            known = ", ".join(self.stage_outputs) or "none"
            raise FileNotFoundError(f"{what}: {init_from!r} is {not_a_model_source(known)}") from None

    def stage_path(self, reference: str) -> Path | None:
        """``reference`` inside an earlier stage's ``final/``: ``STAGE`` (the folder) or ``STAGE/SUB/PATH``;
        None when it names no earlier stage (it is then a plain path)."""
        stage, _, rest = reference.partition("/")
        if stage not in self.stage_outputs:
            return None
        return self.stage_outputs[stage] / rest if rest else self.stage_outputs[stage]

    def fingerprint(self, reference: str, what: str = "init_from") -> str:
        """What ``reference`` (an earlier stage, a folder or a hub id, as for :meth:`resolve_init`) holds, as
        a string that changes when it does: an earlier stage's recorded fingerprint, else the
        :func:`~mmfactory.artifacts.folder_stamp` of its folder. For the fingerprints of artifacts."""
        if self.stage_fingerprints.get(reference):
            return f"stage:{self.stage_fingerprints[reference]}"
        return f"files:{folder_stamp(self.resolve_init(reference, what))}"

    def artifact(self, name: str, stage: str | None = None) -> Path:
        """The folder of artifact ``name`` (:mod:`mmfactory.artifacts`: data a ``prepare`` step made, such
        as ``teacher_topk``) of this stage, or of the earlier stage ``stage``. Another stage's artifact must
        be complete (a stage reads it; only its own stage writes it)."""
        if stage is None:
            return self.stage_dir / name
        if stage not in self.stage_outputs:
            known = ", ".join(self.stage_outputs) or "none"
            raise FileNotFoundError(f"artifact {name!r}: {stage!r} is no earlier stage (known: {known})")
        folder = self.stage_outputs[stage].parent / name  # the stage's folder holds final/ and its artifacts
        if recorded_fingerprint(folder) is None:
            raise FileNotFoundError(f"artifact {name!r}: stage {stage!r} prepared none ({folder})")
        return folder


class TrainingTask(nn.Module):
    """Base class of every task. Subclasses declare their config schemas and implement the hooks.

    Schemas (dataclasses) validate the stage's ``model``, ``data`` and ``options`` sections.
    ``loss_unit`` names what :meth:`loss_weight` counts (shown as throughput, e.g. ``tokens/s``).
    A task with ``trains = False`` (scoring or selecting data, say) implements :meth:`run` instead of the
    training hooks. ``sample_kind`` is the kind of sample the task reads from its ``data.train`` /
    ``data.eval`` sources (:mod:`mmfactory.data.sources`), ``extra_sources`` the kinds of its other source
    lists (data field -> kind); both are checked when the recipe is validated. Data made by a model (a
    teacher, a drafter, the policy itself) is made in :meth:`prepare`, never inside the data hooks.
    """

    model_config: ClassVar[type]
    data_config: ClassVar[type]
    options_config: ClassVar[type]
    loss_unit: ClassVar[str] = "samples"
    trains: ClassVar[bool] = True  # False: a stage that trains nothing; the runner calls run() instead
    sample_kind: ClassVar[str | None] = None
    extra_sources: ClassVar[dict[str, str]] = {}

    @property
    def _no_split_modules(self) -> list[str]:
        """The layer classes of the task's Hugging Face models (their own ``_no_split_modules``): under FSDP
        with ``TRANSFORMER_BASED_WRAP``, accelerate shards each such layer as a unit."""
        names: dict[str, None] = {}
        for module in self.modules():
            if module is not self:
                names.update(dict.fromkeys(getattr(module, "_no_split_modules", None) or ()))
        return list(names)

    def __init__(self, stage: StageConfig, ctx: StageContext, model_cfg: Any, data_cfg: Any, options: Any):
        super().__init__()
        self.stage = stage
        self.ctx = ctx
        self.model_cfg = model_cfg
        self.data_cfg = data_cfg
        self.options = options

    # -- preparation ------------------------------------------------------------------------------
    def prepare(self, accelerator) -> None:
        """Make the model-made data the stage reads (a teacher's top-k log-probs, a frozen LLM's drafts,
        sampled pairs), before any data hook. The runner calls it on every process, after building the task
        and before training (or :meth:`run`). Write each through
        :func:`mmfactory.artifacts.prepare_artifact`: the main process builds it with a progress bar while
        the others wait, then all read it; it is fingerprinted, written atomically, reused when valid and
        refused when not. Other stages find it by name (:meth:`StageContext.artifact`). Nothing by default."""

    # -- data -------------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def eval_dataset(self) -> Dataset | None:
        return None

    def collate(self, samples: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def read_sources(self, split: str, counts: Counter):
        """The stage's ``data.train`` / ``data.eval`` sources read as :attr:`sample_kind` samples and mixed
        (:func:`mmfactory.data.sources.read_sources`); counts go to ``counts`` under ``{split}/``."""
        from mmfactory.data.sources import read_sources

        cfg = self.data_cfg
        sources = [self.resolve_source(s) for s in (cfg.train if split == "train" else cfg.eval)]
        seed, report = self.stage.train.seed, self.ctx.is_main_process
        return read_sources(sources, self.sample_kind, counts, split, cfg.max_bad_fraction, seed, report)

    def resolve_source(self, source):
        """``source`` with a ``keep_uids`` that names an earlier stage (``STAGE``, or ``STAGE/keep-F`` for a
        ``pool_filter`` stage's selection at another fraction) read from that folder's ``kept_uids.txt``."""
        folder = None if source.keep_uids is None else self.ctx.stage_path(source.keep_uids)
        if folder is not None:
            return dataclasses.replace(source, keep_uids=str(folder / "kept_uids.txt"))
        return source

    def train_lengths(self) -> list[int] | None:
        """Per training sample, its length in tokens, negative for a text-only sample (LLaVA's
        modality-length convention), for ``train.group_by_length``; None: the samples have none."""
        return None

    def data_report(self) -> dict[str, int]:
        """Counts the data layer wants recorded (skipped samples by reason, truncations, ...)."""
        return {}

    # -- math -------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``{"loss": mean loss over this micro-batch's loss items, **metrics}``."""
        raise NotImplementedError

    def lr_scale(self, name: str) -> float:
        """Multiplier of the stage's learning rate for parameter ``name`` (e.g. layer-wise decay); 1 here."""
        return 1.0

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items the micro-batch loss averages over (default: samples).

        The loop weights micro-batches by it, so the optimizer step minimises the mean over all items
        of the global batch: gradient accumulation and process count do not change the result.
        """
        return len(next(iter(batch.values())))

    # -- evaluation and output ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Task-level evaluation after training (generation metrics, accuracy...). Main process only."""
        return {}

    def run(self, accelerator) -> dict[str, float]:
        """The work of a stage that trains nothing (``trains = False``), on every process; returns the
        stage's metrics (the main process's are recorded)."""
        raise NotImplementedError

    def save_pretrained(self, out_dir: Path) -> None:
        """Write Hugging Face-native artifacts that a later stage's ``init_from`` can load."""
        raise NotImplementedError
