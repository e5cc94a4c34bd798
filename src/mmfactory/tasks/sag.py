"""SAG stages (Xu et al., arXiv 2410.03137): a frozen LLM drafts, a small stylist LM restyles.

==================  ==================  =====================================================================
stage (sag/tiny)    task                what it trains; what its NoteBench evaluation reports
==================  ==================  =====================================================================
``stylist_alone``   sag_stylist_sft     facts -> styled article; the small LM alone (``stylist_alone``)
``s_sft``           sag_stylist_sft     S-SFT: draft -> styled article; ``llm_alone`` and ``llm+stylist``
``c_dpo``           sag_cdpo            C-DPO: faithful vs hallucinated article, the S-SFT stylist as the
                                        frozen reference; ``llm+stylist``
``self_improve``    sag_self_improve    the stylist's filtered samples join the S-SFT data; ``llm+stylist``
==================  ==================  =====================================================================

Every SAG stage's prepare step makes the frozen LLM's drafts it reads (artifacts ``<stage>/drafts-{split}/``,
copied from an earlier stage that made the same) and, for self-improvement, the round's samples
(``<stage>/self_improve/``); the pipeline behind them is the :mod:`mmfactory.sag` package
(:class:`~mmfactory.sag.stage.SAGStage`). The drafter is loaded only when something is left to draft or
the ``llm_alone`` system is scored, and never trained. Every stage ends with a NoteBench evaluation on the
benchmark articles: predictions go to ``<stage>/notebench/``, and ``<run>/notebench.md`` collects the
comparison table of every SAG stage so far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mmfactory.artifacts import fingerprint_digest, prepare_artifact
from mmfactory.config import ConfigError, to_dict
from mmfactory.data.chat import resolve_template
from mmfactory.data.source_config import SourceConfig
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from mmfactory.models.lora import LoraOptions
from mmfactory.sag.config import (
    BENCHMARKS,
    DrafterConfig,
    SAGDataConfig,
    SAGGenerationOptions,
    SAGOptions,
    SelfImproveOptions,
    Split,
)
from mmfactory.sag.data import hallucinated_article
from mmfactory.sag.pipeline import ChatLM, System
from mmfactory.sag.self_improve import ROUND_ARTIFACT, read_kept, read_stats, sample_round, write_round
from mmfactory.sag.stage import SAGStage, chat
from mmfactory.tasks.base import StageContext
from mmfactory.tasks.causal_lm import CHAT_META, CausalLMSFTTask
from mmfactory.tasks.preference import CausalLMDPOTask, DPOModelConfig, DPOOptions


@dataclass
class SAGModelConfig(CausalLMConfig):
    """The stylist (the :class:`CausalLMConfig` fields, or the stage's ``init_from``) and the drafter."""

    drafter: DrafterConfig | None = None


@dataclass
class SAGDPOModelConfig(DPOModelConfig):
    """The stylist, its DPO reference (default: the stylist as the stage starts) and the drafter."""

    drafter: DrafterConfig | None = None


@dataclass
class SAGDPOOptions:
    """C-DPO: the S-SFT stage's groups (``systems``, ``generation``, ``lora``) and the preference loss
    (``dpo``)."""

    systems: list[System] = field(default_factory=lambda: ["llm+stylist"])
    generation: SAGGenerationOptions = field(default_factory=SAGGenerationOptions)
    lora: LoraOptions | None = None
    dpo: DPOOptions = field(default_factory=DPOOptions)


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


class _SAGTask:
    """Mixin of the SAG tasks: ``self.sag`` (:class:`~mmfactory.sag.stage.SAGStage`, which holds the frozen
    drafter), the prepare step that makes the LLM's drafts, and the NoteBench evaluation of the stylist."""

    def _setup_sag(self) -> None:
        cfg, options = self.data_cfg, self.options
        llm_drafts = cfg.stylist_input == "draft" and cfg.draft_source != "given"
        needs_drafter = llm_drafts or any(s in ("llm_alone", "llm+stylist") for s in options.systems)
        self.sag = SAGStage(
            cfg,
            options.systems,
            options.generation,
            self.ctx,
            self.model_cfg.drafter,
            needs_drafter,
            self._device,
        )

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stylist(self) -> ChatLM:
        return ChatLM(self.model, self.tokenizer, self.template)

    def draft_splits(self) -> list[Split]:
        """The splits whose drafts the stage reads: its training data's, NoteBench's for the
        ``llm+stylist`` system, and the style scorer's when the training articles have none."""
        splits: list[Split] = ["train", "eval"] if self.data_cfg.stylist_input == "draft" else []
        if "llm+stylist" in self.options.systems:
            splits += list(BENCHMARKS)
        if self.options.systems and self.sag.benchmark_splits() and self.sag.scorer_needs_drafts():
            splits.append("train")
        return splits

    def prepare(self, accelerator) -> None:
        """The frozen LLM's drafts of :meth:`draft_splits`, as artifacts ``drafts-{split}/``."""
        self.sag.prepare_drafts(accelerator, self.draft_splits())

    def data_report(self) -> dict[str, int]:
        return {**super().data_report(), **self.sag.counts}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return self.sag.benchmark(self.stylist())


class SAGStylistSFTTask(_SAGTask, CausalLMSFTTask):
    """S-SFT of the stylist on (draft -> styled article) chats, or (facts -> styled) with
    ``data.stylist_input: facts``; the loss and everything else are those of ``causal_lm_sft``."""

    model_config = SAGModelConfig
    data_config = SAGDataConfig
    options_config = SAGOptions
    sample_kind = "article"
    extra_sources = {"benchmark": "article", "benchmark_needs_llm": "article", "self_improve": "article"}

    def __init__(self, stage, ctx, model_cfg: SAGModelConfig, data_cfg: SAGDataConfig, options: SAGOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self._setup_sag()

    def conversations(self, split: str) -> list[list[dict[str, str]]]:
        if split not in self._conversations:
            self._conversations[split] = self.build_conversations(split)
        return self._conversations[split]

    def build_conversations(self, split: Split) -> list[list[dict[str, str]]]:
        articles = self.sag.articles(split)
        prompts = self.sag.stylist_prompts(split, self.data_cfg.stylist_input)
        return [chat(p, a["reference"]) for p, a in zip(prompts, articles, strict=True)]


class SAGContentDPOTask(_SAGTask, CausalLMDPOTask):
    """C-DPO: for the stylist's prompt (the draft to restyle), chosen = the faithful styled article,
    rejected = the same with a fact added or contradicted (:func:`~mmfactory.sag.data.hallucinated_article`);
    sigmoid DPO against the frozen S-SFT stylist."""

    model_config = SAGDPOModelConfig
    data_config = SAGDataConfig
    options_config = SAGDPOOptions
    sample_kind = "article"
    extra_sources = {"benchmark": "article", "benchmark_needs_llm": "article", "self_improve": "article"}

    def __init__(self, stage, ctx, model_cfg: SAGDPOModelConfig, data_cfg: SAGDataConfig, options):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self._setup_sag()

    def pairs(self, split: str) -> list[dict[str, str]]:
        articles = self.sag.articles(split)
        prompts = self.sag.stylist_prompts(split, self.data_cfg.stylist_input)
        pairs = []
        for i, (prompt, article) in enumerate(zip(prompts, articles, strict=True)):
            rejected = hallucinated_article(article, i, articles)
            if rejected is None:
                self.counts[f"{split}/skipped_no_negative"] += 1  # no fact value to contradict
                continue
            pairs.append({"prompt": prompt, "chosen": article["reference"], "rejected": rejected})
        return pairs


class SAGSelfImproveTask(SAGStylistSFTTask):
    """One self-improvement round: the stylist (as the stage starts) samples candidates for new inputs,
    the filter keeps those in style and faithful, and the stylist is S-SFT-trained on the S-SFT pairs
    plus the kept samples (of this round and ``previous_rounds``).

    The prepare step samples and filters once into the artifact ``self_improve/`` (``kept.jsonl`` and
    ``stats.json``, :mod:`mmfactory.sag.self_improve`); the stats join the stage metrics.
    """

    options_config = SelfImproveOptions

    def __init__(self, stage, ctx, model_cfg, data_cfg, options: SelfImproveOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        unknown = [name for name in options.previous_rounds if name not in ctx.stage_outputs]
        if unknown:
            raise ConfigError(f"options.previous_rounds: {unknown} are not earlier stages of this run")
        if self.sag.claims is None:
            raise ConfigError("data.claim_checker: the self-improvement filter checks claims; name a checker")
        self.round_stats: dict[str, float] = {}

    def draft_splits(self) -> list[Split]:
        splits = super().draft_splits()  # and the sampling inputs' drafts; the filter's scorer always runs
        splits += ["self_improve"] if self.data_cfg.stylist_input == "draft" else []
        return splits + (["train"] if self.sag.scorer_needs_drafts() else [])

    def sampling(self) -> GenerationConfig:
        """Articles of ``generation``'s length and batch size, sampled as ``sampling`` says."""
        generation, sampling = self.options.generation, self.options.sampling
        return GenerationConfig(
            max_new_tokens=generation.article_max_new_tokens,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            batch_size=generation.batch_size,
        )

    def round_fingerprint(self, prompts: list[str]) -> dict[str, Any]:
        """What a round's samples are made from: the stylist as the stage starts (what it starts from and
        its config), the stage seed, the sampling and filter settings, the data config (inputs, scorer,
        claim checker), the drafter and the stylist's prompts."""
        start = self.stage.init_from
        return {
            "artifact": ROUND_ARTIFACT,
            "stylist": {start: self.ctx.fingerprint(start)} if start is not None else {},
            "model": to_dict(self.model_cfg),
            "seed": self.stage.train.seed,
            "candidates": self.options.sampling.candidates,
            "sampling": to_dict(self.sampling()),
            "filter": to_dict(self.options.filter),
            "data": to_dict(self.data_cfg),
            "drafter": self.sag.drafter_fingerprint(),
            "prompts": fingerprint_digest({"prompts": prompts}),
        }

    def prepare(self, accelerator) -> None:
        """The drafts, then this round's samples: drawn after seeding with the stage seed, filtered, and
        written to the artifact ``self_improve/``."""
        super().prepare(accelerator)
        opts, inputs = self.options, self.sag.articles("self_improve")
        prompts = self.sag.stylist_prompts("self_improve", self.data_cfg.stylist_input)

        def build(folder: Path, bar) -> None:
            args = (opts.sampling.candidates, self.sampling(), self.stage.train.seed, self.sag.scorer())
            kept, stats = sample_round(self.stylist(), prompts, inputs, *args, opts.filter, self.sag.claims)
            write_round(folder, kept, stats)
            bar.update(len(prompts))
            summary = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()
            )
            print(f"[{self.stage.name}] self-improvement: {summary}")

        key = self.round_fingerprint(prompts)
        folder = self.ctx.artifact(ROUND_ARTIFACT)
        prepare_artifact(accelerator, folder, key, build, len(prompts), "self-improvement samples")
        self.round_stats = read_stats(folder)

    def build_conversations(self, split: Split) -> list[list[dict[str, str]]]:
        conversations = super().build_conversations(split)
        if split != "train":
            return conversations
        kept = read_kept(self.ctx.artifact(ROUND_ARTIFACT))
        for name in self.options.previous_rounds:
            kept += read_kept(self.ctx.artifact(ROUND_ARTIFACT, stage=name))
        return conversations + [chat(k["prompt"], k["article"]) for k in kept]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate()
        metrics.update({f"filter/{key}": value for key, value in self.round_stats.items()})
        return metrics


def notebench_file(
    articles: str | Path,
    output: str | Path,
    systems: list[System],
    stylist_dir: str | Path | None = None,
    drafter: DrafterConfig | None = None,
    scorer_articles: str | Path | None = None,
) -> dict[str, float]:
    """NoteBench on an article JSONL file, outside any recipe (e.g. for a CLI ``eval`` command).

    ``stylist_dir`` is a trained stylist (a stage's ``final/``); ``drafter`` the frozen LLM. The style
    scorer is fitted on ``scorer_articles`` (default: ``articles`` themselves, references vs drafts).
    Drafts (``drafts-{split}/``), predictions (``notebench/``) and ``notebench.md`` go to ``output``.
    Returns ``{"notebench/{system}/...": v}``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data = SAGDataConfig(
        train=[SourceConfig("articles", path=str(scorer_articles or articles))],
        eval=[],
        benchmark=[SourceConfig("articles", path=str(articles))],
        self_improve=None,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    needs_drafter = any(system != "stylist_alone" for system in systems)
    ctx = StageContext(output, output)
    sag = SAGStage(data, systems, SAGGenerationOptions(), ctx, drafter, needs_drafter, lambda: device)
    if stylist_dir is None and any(system != "llm_alone" for system in systems):
        raise ValueError(f"systems {systems} need a stylist: pass stylist_dir")
    splits: list[Split] = ["benchmark"] if "llm+stylist" in systems else []
    splits += ["train"] if sag.scorer_needs_drafts() else []
    sag.prepare_drafts(SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None), splits)
    stylist = None
    if stylist_dir is not None:
        model, tokenizer = load_causal_lm(CausalLMConfig(), Path(stylist_dir))
        model.to(device)
        meta = Path(stylist_dir) / CHAT_META
        template = json.loads(meta.read_text())["template"] if meta.is_file() else "chatml"
        stylist = ChatLM(model, tokenizer, resolve_template(template, tokenizer))
    return sag.benchmark(stylist)
