"""What every SAG stage shares (:class:`SAGStage`): its articles, the frozen drafter, the drafts, the style
scorer and the NoteBench evaluation.

Drafts by the frozen LLM are made by the stage's prepare step (:meth:`SAGStage.prepare_drafts`), one
artifact (:mod:`mmfactory.artifacts`) per split: ``drafts-{split}/drafts.jsonl`` (the article records, each
with its ``draft``). They depend on nothing a stage trains, so a stage whose earlier stage already drafted
the same articles in the same way (equal fingerprint, :meth:`SAGStage.drafts_fingerprint`) copies that
stage's file instead of loading the drafter. NoteBench's predictions and scores are written to the
stage's ``notebench/`` folder (``{system}{suffix}.jsonl`` and ``metrics.json``, with a fingerprint, so that
later stages find it by name) and ``<run>/notebench.md`` collects the comparison table of every SAG stage
so far.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from mmfactory.artifacts import (
    build_artifact,
    fingerprint_digest,
    folder_stamp,
    prepare_artifact,
    recorded_fingerprint,
)
from mmfactory.config import ConfigError, to_dict
from mmfactory.data.chat import resolve_template
from mmfactory.data.sources import read_sources
from mmfactory.examples import Example, write_examples
from mmfactory.models.lm import load_causal_lm, locate_gguf
from mmfactory.sag.config import BENCHMARKS, DrafterConfig, SAGDataConfig, SAGGenerationOptions, Split
from mmfactory.sag.data import fill
from mmfactory.sag.notebench import comparison_table, load_claim_checker, notebench_scores, rows_from_metrics
from mmfactory.sag.pipeline import ChatLM, System, stylist_prompts, write_drafts
from mmfactory.sag.self_improve import ClaimsFn, claim_verdicts
from mmfactory.sag.style import StyleScorer

if TYPE_CHECKING:
    from mmfactory.tasks.base import StageContext

DRAFTS_FILE = "drafts.jsonl"
NOTEBENCH = "notebench"  # the folder of a stage's NoteBench predictions and metrics
METRICS_FILE = "metrics.json"


def drafts_artifact(split: str) -> str:
    return f"drafts-{split}"


def resolve_drafter(cfg: DrafterConfig, ctx: StageContext) -> tuple[DrafterConfig, Path | None]:
    """The drafter's config with its GGUF file located, and where its weights are (``None``: tiny).

    A missing GGUF package or file is a clear error.
    """
    cfg = locate_gguf(cfg)
    if cfg.gguf_file is not None:
        return cfg, Path(cfg.path) / cfg.gguf_file
    if cfg.path is not None:
        return cfg, ctx.resolve_init(cfg.path, "model.drafter.path")
    return cfg, None


def load_drafter(cfg: DrafterConfig, ctx: StageContext) -> ChatLM:
    """The frozen drafter (``requires_grad=False``, eval mode), ready for batched generation."""
    cfg, _ = resolve_drafter(cfg, ctx)
    init_dir = ctx.stage_outputs.get(cfg.path) if cfg.path is not None else None
    model, tokenizer = load_causal_lm(cfg, init_dir)
    model.requires_grad_(False)
    model.eval()
    return ChatLM(model, tokenizer, resolve_template(cfg.template, tokenizer), cfg.system)


class SAGStage:
    """Articles, the frozen drafter, drafts, the style scorer and NoteBench of one SAG stage: ``systems``
    are NoteBench's, ``generation`` how drafts and articles are generated (the stage's option groups)."""

    def __init__(
        self,
        cfg: SAGDataConfig,
        systems: list[System],
        generation: SAGGenerationOptions,
        ctx: StageContext,
        drafter_cfg: DrafterConfig | None,
        needs_drafter: bool,
        device: Callable[[], torch.device] = lambda: torch.device("cpu"),
    ):
        self.cfg, self.ctx, self.drafter_cfg = cfg, ctx, drafter_cfg
        self.systems, self.generation = systems, generation
        self.device = device
        self.counts: Counter = Counter()
        if needs_drafter and drafter_cfg is None:
            raise ConfigError(
                "model.drafter: this stage needs the frozen LLM (its data or its NoteBench systems)"
            )
        # Resolved now, so that a missing drafter fails before anything trains.
        self.drafter_weights = resolve_drafter(drafter_cfg, ctx)[1] if drafter_cfg is not None else None
        self.claims = load_claim_checker(cfg.claim_checker)  # a bad checker fails before training
        self._drafter: ChatLM | None = None
        self._articles: dict[str, list[dict[str, Any]]] = {}
        self._scorer: StyleScorer | None = None

    def drafter(self) -> ChatLM:
        """The frozen LLM, loaded on first use onto ``device()``: a stage whose drafts were all made by an
        earlier stage never loads it. It is no submodule of the task, so nothing trains it."""
        if self._drafter is None:
            if self.drafter_cfg is None:
                raise ConfigError("model.drafter: this stage needs the frozen LLM")
            self._drafter = load_drafter(self.drafter_cfg, self.ctx)
            self._drafter.model.to(self.device())
        return self._drafter

    def drafter_fingerprint(self) -> str | None:
        """What the drafter's weights are (an earlier stage's fingerprint, or the stamp of its files)."""
        if self.drafter_weights is None:
            return None  # a tiny drafter: its config says it all
        if self.drafter_cfg.gguf_file is None and self.drafter_cfg.path is not None:
            return self.ctx.fingerprint(self.drafter_cfg.path, "model.drafter.path")
        return f"files:{folder_stamp(self.drafter_weights)}"

    # -- articles and drafts ---------------------------------------------------------------------------
    def articles(self, split: Split) -> list[dict[str, Any]]:
        """The ``article`` samples of ``split`` (``self_improve: null``: those of ``train``)."""
        if split not in self._articles:
            cfg = self.cfg
            sources = getattr(cfg, split)
            if sources is None:
                sources = cfg.train
            samples = read_sources(
                sources, "article", self.counts, split, cfg.max_bad_fraction, report=self.ctx.is_main_process
            )
            self._articles[split] = [] if samples is None else samples.items
        return self._articles[split]

    def draft_source(self, split: Split) -> Literal["given", "facts", "article"]:
        """Where ``split``'s drafts come from (see :class:`SAGDataConfig`)."""
        source = self.cfg.draft_source
        if split in BENCHMARKS or (split == "self_improve" and source == "article"):
            return "facts"  # a deployed stylist gets the LLM's drafts; inputs of new rounds have no article
        return source

    def drafts(self, split: Split) -> list[str]:
        """The drafts the stylist restyles for ``split``: the given ones, or those the prepare step made."""
        articles = self.articles(split)
        if self.draft_source(split) != "given":
            if not articles:
                return []
            folder = self.ctx.artifact(drafts_artifact(split))
            if recorded_fingerprint(folder) is None:
                raise RuntimeError(f"the {split} drafts are read before the stage's prepare step made them")
            return [json.loads(line)["draft"] for line in (folder / DRAFTS_FILE).read_text().splitlines()]
        missing = [a["id"] for a in articles if not a["draft"]]
        if missing:
            raise ConfigError(f"data.draft_source: given, but article {missing[0]!r} has no draft")
        return [a["draft"] for a in articles]

    def drafts_fingerprint(self, split: Split) -> dict[str, Any]:
        """What the LLM's drafts of ``split`` are made from: the drafter (config and weights), the request
        template, the generation settings, the articles' ids and inputs."""
        source, articles, prompts = self.draft_source(split), self.articles(split), self.cfg.prompts
        return {
            "artifact": "drafts",
            "drafter": to_dict(self.drafter_cfg),
            "weights": self.drafter_fingerprint(),
            "template": prompts.draft if source == "facts" else prompts.neutralize,
            "max_new_tokens": self.generation.draft_max_new_tokens,
            "batch_size": self.generation.batch_size,
            "ids": [a["id"] for a in articles],
            "inputs": [a.get("input") for a in articles],
        }

    def prepare_drafts(self, accelerator, splits: list[Split]) -> None:
        """The artifact ``drafts-{split}`` of each of ``splits`` the LLM drafts (a split with given drafts or
        no articles has none): copied from an earlier stage that made the same, else drafted."""
        for split in dict.fromkeys(splits):
            source, articles = self.draft_source(split), self.articles(split)
            if source == "given" or not articles:
                continue
            if source == "facts" and any(not a["facts"] for a in articles):
                raise ConfigError(
                    f"data: the LLM drafts {split} articles from their facts, and some have none"
                )
            key = self.drafts_fingerprint(split)
            earlier = self._earlier_artifact(drafts_artifact(split), key)

            def build(
                folder: Path, bar, split=split, source=source, articles=articles, earlier=earlier
            ) -> None:
                if earlier is not None:
                    shutil.copyfile(earlier / DRAFTS_FILE, folder / DRAFTS_FILE)
                else:
                    generation = self.generation.greedy("draft")
                    drafts = write_drafts(self.drafter(), articles, self.cfg.prompts, source, generation)
                    records = [
                        {**article_record(a), "draft": d} for a, d in zip(articles, drafts, strict=True)
                    ]
                    write_jsonl(folder / DRAFTS_FILE, records)
                bar.update(len(articles))

            folder = self.ctx.artifact(drafts_artifact(split))
            prepare_artifact(accelerator, folder, key, build, len(articles), f"{split} drafts")

    def _earlier_artifact(self, name: str, key: dict[str, Any]) -> Path | None:
        """The artifact ``name`` of the first earlier stage that made it from ``key``, if any."""
        for stage in self.ctx.stage_outputs:
            try:
                folder = self.ctx.artifact(name, stage)
            except FileNotFoundError:
                continue
            if fingerprint_digest(recorded_fingerprint(folder)) == fingerprint_digest(key):
                return folder
        return None

    def stylist_prompts(self, split: Split, stylist_input: Literal["draft", "facts"]) -> list[str]:
        drafts = self.drafts(split) if stylist_input == "draft" else None
        return stylist_prompts(self.articles(split), drafts, self.cfg.prompts, stylist_input)

    # -- style scorer and NoteBench --------------------------------------------------------------------
    def scorer_articles(self) -> list[dict[str, Any]]:
        return self.articles("train")[: self.cfg.style_scorer_texts]

    def scorer_needs_drafts(self) -> bool:
        """Whether the style scorer's neutral texts include the train split's drafts by the LLM."""
        return not all(a["draft"] for a in self.scorer_articles())

    def scorer(self) -> StyleScorer:
        """Fitted on training references (styled) against neutral texts: their drafts (given ones, else
        the LLM's) and, for world articles, their off-style variants (the same words without the style's
        markers), so that it scores the style rather than the wording. Fitted once per run."""
        if self._scorer is None:
            articles = self.scorer_articles()
            if self.scorer_needs_drafts():
                neutral = self.drafts("train")[: len(articles)]
            else:
                neutral = [a["draft"] for a in articles]
            neutral += [a["variants"]["off_style"] for a in articles if "variants" in a]
            styled = [a["reference"] for a in articles]
            key = json.dumps([to_dict(self.cfg.style_scorer), styled, neutral], ensure_ascii=False)
            path = self.ctx.run_dir / "style_scorer" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
            if path.is_file():
                self._scorer = StyleScorer.load(path)
            else:
                self._scorer = StyleScorer.fit(styled, neutral, self.cfg.style_scorer)
                if self.ctx.is_main_process:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                    self._scorer.save(tmp)
                    tmp.replace(path)
        return self._scorer

    def benchmark_splits(self) -> list[Split]:
        """The NoteBench splits with articles."""
        return [split for split in BENCHMARKS if self.articles(split)]

    def benchmark(self, stylist: ChatLM | None) -> dict[str, float]:
        """NoteBench of every configured system on each benchmark split (main process only): predictions and
        ``metrics.json`` go to the stage's ``notebench/``, the comparison table to ``<run>/notebench.md``."""
        splits, systems = self.benchmark_splits(), self.systems
        if not splits or not systems:
            return {}
        metrics: dict[str, float] = {}

        def build(folder: Path, bar) -> None:
            for split in splits:
                metrics.update(self.benchmark_split(stylist, split, folder, bar))
            (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=1))

        # Evaluated anew each time (the stylist changes as the stage trains): the fingerprint says what of.
        key = {
            "artifact": NOTEBENCH,
            "systems": systems,
            **{s: to_dict(getattr(self.cfg, s)) for s in splits},
        }
        build_artifact(self.ctx.artifact(NOTEBENCH), key, build, len(splits) * len(systems), "NoteBench")
        self._write_comparison(metrics)
        return metrics

    def benchmark_split(self, stylist: ChatLM | None, split: Split, folder: Path, bar) -> dict[str, float]:
        """NoteBench of every configured system on one split: ``{folder}/{system}{suffix}.jsonl``."""
        articles, suffix = self.articles(split), BENCHMARKS[split]
        if any(not a["facts"] for a in articles):
            raise ConfigError(f"data.{split}: NoteBench checks facts, and some benchmark articles have none")
        prompts, generation = self.cfg.prompts, self.generation.greedy("article")
        metrics: dict[str, float] = {}
        for system in self.systems:
            drafts = None
            if system == "llm_alone":
                predictions = self.drafter().reply([fill(prompts.llm_style, a) for a in articles], generation)
            elif system == "stylist_alone":
                predictions = stylist.reply(stylist_prompts(articles, None, prompts, "facts"), generation)
            else:
                drafts = self.drafts(split)
                predictions = stylist.reply(stylist_prompts(articles, drafts, prompts, "draft"), generation)
            scores = notebench_scores(predictions, articles, self.claims, self.scorer())
            metrics.update({f"notebench/{system}{suffix}/{key}": value for key, value in scores.items()})
            records = [
                {**article_record(a), **({"draft": drafts[i]} if drafts else {}), "prediction": p}
                for i, (a, p) in enumerate(zip(articles, predictions, strict=True))
            ]
            write_jsonl(folder / f"{system}{suffix}.jsonl", records)
            if self.claims is not None:
                examples = note_examples(records, self.claims)
                write_examples(self.ctx.stage_dir, f"NoteBench: {system}{suffix}", examples)
            bar.update(1)
        return metrics

    def _write_comparison(self, metrics: dict[str, float]) -> None:
        """``<run>/notebench.md``: the NoteBench rows of every earlier stage and of this one."""
        rows = []
        for name in self.ctx.stage_outputs:
            try:
                folder = self.ctx.artifact(NOTEBENCH, name)
            except FileNotFoundError:
                continue  # no SAG stage, or one without NoteBench
            earlier = json.loads((folder / METRICS_FILE).read_text())
            rows += rows_from_metrics({f"{name}/{key}": value for key, value in earlier.items()})
        rows += rows_from_metrics({f"{self.ctx.stage_dir.name}/{key}": v for key, v in metrics.items()})
        table = comparison_table(rows)
        where = self.ctx.run_dir / "notebench.md"
        where.write_text(f"# NoteBench\n\n{table}\n")
        print(f"\nNoteBench after stage {self.ctx.stage_dir.name} (also in {where}):\n{table}")


def note_examples(records: list[dict[str, Any]], claims_fn: ClaimsFn, per_lang: int = 2) -> list[Example]:
    """The first ``per_lang`` notes of each language beside their facts (and draft), the claims the facts
    do not support or contradict marked; right when there are none."""
    shown = []
    for lang in sorted({r["lang"] for r in records}):
        for r in [r for r in records if r["lang"] == lang][:per_lang]:
            claims = claims_fn(r["prediction"], lang)
            verdicts = claim_verdicts(claims, r["facts"])
            wrong = [claims[a] for a, verdict in verdicts.items() if verdict != "stated"]
            fields = {"facts": ", ".join(f"{a}: {v}" for a, v in r["facts"].items())}
            if "draft" in r:
                fields["draft"] = r["draft"]
            fields["styled note"] = r["prediction"]
            marks = {"styled note": [v for v in wrong if v in r["prediction"]]}
            shown.append(Example(f"{lang} · {r['id']}", fields, correct=not wrong, marks=marks))
    return shown


def article_record(article: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "lang", "facts", "draft", "reference", "input")
    return {key: article[key] for key in keys if key in article}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def chat(prompt: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
