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

Every SAG stage loads the frozen drafter (``model.drafter``) when it needs it, never trains it, and ends
with a NoteBench evaluation on the benchmark articles: predictions go to ``<stage>/notebench/``, and
``<run>/notebench.md`` collects the comparison table of every SAG stage so far. Drafts by the frozen
LLM depend on nothing a stage trains, so they are written once per run to ``<run>/drafts/`` (article
JSONL, reusable as data) and reused by every stage asking for the same drafts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmfactory.config import ConfigError, to_dict
from mmfactory.data.chat import TemplateName, resolve_template
from mmfactory.data.sources import SourceConfig, check_fraction, read_sources
from mmfactory.examples import Example, write_examples
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.lm import CausalLMConfig, load_causal_lm, locate_gguf
from mmfactory.sag.data import SAGPrompts, fill, hallucinated_article
from mmfactory.sag.notebench import comparison_table, load_claim_checker, notebench_scores, rows_from_metrics
from mmfactory.sag.pipeline import ChatLM, System, stylist_prompts, write_drafts
from mmfactory.sag.self_improve import ClaimsFn, FilterConfig, claim_verdicts, filter_candidates
from mmfactory.sag.style import StyleScorer, StyleScorerConfig
from mmfactory.tasks.base import StageContext
from mmfactory.tasks.causal_lm import CHAT_META, CausalLMSFTTask
from mmfactory.tasks.preference import CausalLMDPOTask, DPOModelConfig, DPOOptions, load_frozen_lm

Split = Literal["train", "eval", "benchmark", "benchmark_needs_llm", "self_improve"]
BENCHMARKS = {"benchmark": "", "benchmark_needs_llm": "@needs_llm"}  # split -> suffix of its systems' rows


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class DrafterConfig(CausalLMConfig):
    """The frozen LLM. ``path``: a local folder or the name of an earlier stage (e.g. the tiny stand-in
    LLM); a GGUF file: ``gguf_file`` absolute, or inside ``path``, or inside the installed Python package
    ``gguf_package``; ``tiny`` for tests."""

    template: TemplateName = "chatml"
    system: str | None = None  # a system turn before every request


@dataclass
class SAGModelConfig(CausalLMConfig):
    """The stylist (the :class:`CausalLMConfig` fields, or the stage's ``init_from``) and the drafter."""

    drafter: DrafterConfig | None = None


@dataclass
class SAGDPOModelConfig(DPOModelConfig):
    """The stylist, its DPO reference (default: the stylist as the stage starts) and the drafter."""

    drafter: DrafterConfig | None = None


def _world_articles(split: str, size: int, offset: int = 0) -> SourceConfig:
    return SourceConfig(
        "world", kind="articles", split=split, size=size, offset=offset, languages=["en", "zh"]
    )


@dataclass
class SAGDataConfig:
    """Articles (``article`` sources: the world's ``kind: articles`` or article JSONL, ``format: articles``)
    and how the stylist's training pairs are made of them.

    ``draft_source``: ``given`` uses the articles' drafts; ``facts`` has the frozen LLM draft from the
    facts (what the stylist will see at test time); ``article`` has it neutralise the styled article
    (style imitation data from styled articles alone). ``stylist_input: facts`` trains the stylist to
    write from the facts instead (the stylist-alone baseline). Self-improvement inputs are drafted from
    the facts (or use given drafts); the benchmark always uses the LLM's drafts from the facts.
    ``self_improve: null`` reuses the ``train`` sources; the world's default starts 100k articles into
    the training split, past any S-SFT article.

    ``benchmark_needs_llm``: a second NoteBench split whose inputs need what the LLM brings (the world's
    ``article_requests``: the facts as a seller's free-form message, which the stylist never saw and the
    LLM was instruction-tuned to read); its rows are labelled ``{system}@needs_llm``. ``claim_checker``:
    what reads claims out of a text for the hallucination rates, the self-improvement filter and the
    examples (:func:`~mmfactory.sag.notebench.load_claim_checker`: ``world``, ``module:function``, or null
    for none: rates not judged, and self-improvement refused).
    """

    train: list[SourceConfig] = field(default_factory=lambda: [_world_articles("train", 1000)])
    eval: list[SourceConfig] = field(default_factory=lambda: [_world_articles("val", 32)])
    benchmark: list[SourceConfig] = field(default_factory=lambda: [_world_articles("test", 100)])
    benchmark_needs_llm: list[SourceConfig] = field(default_factory=list)
    claim_checker: str | None = "world"
    self_improve: list[SourceConfig] | None = field(
        default_factory=lambda: [_world_articles("train", 200, offset=100_000)]
    )
    max_bad_fraction: float | None = None  # stop when a source has more bad records than this share
    draft_source: Literal["given", "facts", "article"] = "facts"
    stylist_input: Literal["draft", "facts"] = "draft"
    prompts: SAGPrompts = field(default_factory=SAGPrompts)
    style_scorer: StyleScorerConfig = field(default_factory=StyleScorerConfig)
    style_scorer_texts: int = 1000  # training articles whose texts fit the style scorer
    max_length: int = 192
    template: TemplateName = "chatml"
    pad_to_multiple_of: int | None = None

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("train: at least one source is required")
        check_fraction(self.max_bad_fraction)


@dataclass
class SAGOptions:
    """NoteBench systems to evaluate after training, and generation lengths (greedy decoding)."""

    systems: list[System] = field(default_factory=lambda: ["llm+stylist"])
    draft_max_new_tokens: int = 64
    article_max_new_tokens: int = 96
    generation_batch_size: int = 32

    def generation(self, what: Literal["draft", "article"]) -> GenerationConfig:
        tokens = self.draft_max_new_tokens if what == "draft" else self.article_max_new_tokens
        return GenerationConfig(max_new_tokens=tokens, batch_size=self.generation_batch_size)


@dataclass
class SAGDPOOptions(SAGOptions, DPOOptions):
    """C-DPO: the DPO options and the NoteBench ones."""


@dataclass
class SelfImproveOptions(SAGOptions):
    """One self-improvement round: ``candidates`` samples per input, filtered (style + facts).

    ``previous_rounds``: earlier self-improvement stages whose kept samples also join the data.
    """

    candidates: int = 4
    temperature: float = 1.0
    top_p: float | None = 0.95
    top_k: int | None = None
    filter: FilterConfig = field(default_factory=FilterConfig)
    previous_rounds: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# What every SAG stage shares
# --------------------------------------------------------------------------------------------------


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
    """The frozen drafter, ready for batched generation."""
    cfg, _ = resolve_drafter(cfg, ctx)
    model, tokenizer = load_frozen_lm(cfg, ctx)
    return ChatLM(model, tokenizer, resolve_template(cfg.template, tokenizer), cfg.system)


class SAGStage:
    """Articles, the frozen drafter, drafts, the style scorer and NoteBench of one SAG stage."""

    def __init__(
        self,
        cfg: SAGDataConfig,
        options: SAGOptions,
        ctx: StageContext,
        drafter_cfg: DrafterConfig | None,
        needs_drafter: bool,
        device: Callable[[], torch.device] = lambda: torch.device("cpu"),
    ):
        self.cfg, self.options, self.ctx, self.drafter_cfg = cfg, options, ctx, drafter_cfg
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
        """The frozen LLM, loaded on first use onto ``device()``: a stage whose drafts were all written
        by an earlier stage never loads it. It is no submodule of the task, so nothing trains it."""
        if self._drafter is None:
            if self.drafter_cfg is None:
                raise ConfigError("model.drafter: this stage needs the frozen LLM")
            self._drafter = load_drafter(self.drafter_cfg, self.ctx)
            self._drafter.model.to(self.device())
        return self._drafter

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

    def drafts(self, split: Split) -> list[str]:
        """The drafts the stylist restyles for ``split`` (see :class:`SAGDataConfig` for the source)."""
        source = self.cfg.draft_source
        if split in BENCHMARKS or (split == "self_improve" and source == "article"):
            source = "facts"  # a deployed stylist gets the LLM's drafts; inputs of new rounds have no article
        if source != "given":
            return self.llm_drafts(split, source)
        missing = [a["id"] for a in self.articles(split) if not a["draft"]]
        if missing:
            raise ConfigError(f"data.draft_source: given, but article {missing[0]!r} has no draft")
        return [a["draft"] for a in self.articles(split)]

    def llm_drafts(self, split: Split, source: Literal["facts", "article"]) -> list[str]:
        """Drafts by the frozen LLM, read from ``<run>/drafts/`` when this run wrote them already."""
        articles = self.articles(split)
        if source == "facts" and any(not a["facts"] for a in articles):
            raise ConfigError(f"data: the LLM drafts {split} articles from their facts, and some have none")
        prompts = self.cfg.prompts
        key = {
            "drafter": to_dict(self.drafter_cfg),
            "weights": _fingerprint(self.drafter_weights),
            "template": prompts.draft if source == "facts" else prompts.neutralize,
            "max_new_tokens": self.options.draft_max_new_tokens,
            "ids": [a["id"] for a in articles],
            "inputs": [a.get("input") for a in articles],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        path = self.ctx.run_dir / "drafts" / f"{split}-{source}-{digest[:16]}.jsonl"
        if path.is_file():
            return [json.loads(line)["draft"] for line in path.read_text().splitlines()]
        drafts = write_drafts(self.drafter(), articles, prompts, source, self.options.generation("draft"))
        if self.ctx.is_main_process:
            records = [{**_article_record(a), "draft": d} for a, d in zip(articles, drafts, strict=True)]
            _write_jsonl(path, records)
        return drafts

    def stylist_prompts(self, split: Split, stylist_input: Literal["draft", "facts"]) -> list[str]:
        drafts = self.drafts(split) if stylist_input == "draft" else None
        return stylist_prompts(self.articles(split), drafts, self.cfg.prompts, stylist_input)

    # -- style scorer and NoteBench --------------------------------------------------------------------
    def scorer(self) -> StyleScorer:
        """Fitted on training references (styled) against neutral texts: their drafts (given ones, else
        the LLM's) and, for world articles, their off-style variants (the same words without the style's
        markers), so that it scores the style rather than the wording. Fitted once per run."""
        if self._scorer is None:
            articles = self.articles("train")[: self.cfg.style_scorer_texts]
            if all(a["draft"] for a in articles):
                neutral = [a["draft"] for a in articles]
            else:
                neutral = self.drafts("train")[: len(articles)]
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

    def benchmark(self, stylist: ChatLM) -> dict[str, float]:
        """NoteBench of every configured system on each benchmark split; writes predictions and the run's
        comparison table."""
        metrics: dict[str, float] = {}
        for split, suffix in BENCHMARKS.items():
            metrics.update(self.benchmark_split(stylist, split, suffix))
        if metrics:
            self._write_comparison(metrics)
        return metrics

    def benchmark_split(self, stylist: ChatLM, split: Split, suffix: str) -> dict[str, float]:
        """NoteBench of every configured system on one split: ``notebench/{system}{suffix}/...``."""
        articles = self.articles(split)
        if not articles:
            return {}
        if any(not a["facts"] for a in articles):
            raise ConfigError(f"data.{split}: NoteBench checks facts, and some benchmark articles have none")
        prompts, generation = self.cfg.prompts, self.options.generation("article")
        metrics: dict[str, float] = {}
        for system in self.options.systems:
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
                {**_article_record(a), **({"draft": drafts[i]} if drafts else {}), "prediction": p}
                for i, (a, p) in enumerate(zip(articles, predictions, strict=True))
            ]
            _write_jsonl(self.ctx.stage_dir / "notebench" / f"{system}{suffix}.jsonl", records)
            if self.claims is not None:
                examples = _note_examples(records, self.claims)
                write_examples(self.ctx.stage_dir, f"NoteBench: {system}{suffix}", examples)
        return metrics

    def _write_comparison(self, metrics: dict[str, float]) -> None:
        """``<run>/notebench.md``: the NoteBench rows of every earlier stage and of this one."""
        rows = []
        for name, final_dir in self.ctx.stage_outputs.items():
            done = final_dir.parent / "DONE"
            if done.is_file():
                earlier = json.loads(done.read_text())["metrics"]
                rows += rows_from_metrics({f"{name}/{key}": value for key, value in earlier.items()})
        rows += rows_from_metrics({f"{self.ctx.stage_dir.name}/{key}": v for key, v in metrics.items()})
        table = comparison_table(rows)
        where = self.ctx.run_dir / "notebench.md"
        where.write_text(f"# NoteBench\n\n{table}\n")
        print(f"\nNoteBench after stage {self.ctx.stage_dir.name} (also in {where}):\n{table}")


def _fingerprint(path: Path | None) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the file or of every file under the folder: changes when weights do."""
    if path is None:
        return []
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _note_examples(records: list[dict[str, Any]], claims_fn: ClaimsFn, per_lang: int = 2) -> list[Example]:
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


def _article_record(article: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "lang", "facts", "draft", "reference", "input")
    return {key: article[key] for key in keys if key in article}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)


def _chat(prompt: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


class _SAGTask:
    """Mixin of the SAG tasks: ``self.sag`` (:class:`SAGStage`, which holds the frozen drafter) and the
    NoteBench evaluation of the stylist."""

    def _setup_sag(self) -> None:
        cfg, options = self.data_cfg, self.options
        llm_drafts = cfg.stylist_input == "draft" and cfg.draft_source != "given"
        needs_drafter = llm_drafts or any(s in ("llm_alone", "llm+stylist") for s in options.systems)
        self.sag = SAGStage(cfg, options, self.ctx, self.model_cfg.drafter, needs_drafter, self._device)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stylist(self) -> ChatLM:
        return ChatLM(self.model, self.tokenizer, self.template)

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
        return [_chat(p, a["reference"]) for p, a in zip(prompts, articles, strict=True)]


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

    Writes ``<stage>/self_improve/kept.jsonl`` and ``stats.json``; the stats join the stage metrics.
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

    def build_conversations(self, split: Split) -> list[list[dict[str, str]]]:
        conversations = super().build_conversations(split)
        if split != "train":
            return conversations
        kept = self.sample_and_filter()
        for name in self.options.previous_rounds:
            path = self.ctx.stage_outputs[name].parent / "self_improve" / "kept.jsonl"
            kept += [json.loads(line) for line in path.read_text().splitlines()]
        return conversations + [_chat(k["prompt"], k["article"]) for k in kept]

    def sample_and_filter(self) -> list[dict[str, Any]]:
        """This round's kept samples (read back from the stage folder when resuming)."""
        out_dir = self.ctx.stage_dir / "self_improve"
        if (out_dir / "stats.json").is_file():
            self.round_stats = json.loads((out_dir / "stats.json").read_text())
            return [json.loads(line) for line in (out_dir / "kept.jsonl").read_text().splitlines()]
        opts = self.options
        inputs = self.sag.articles("self_improve")
        prompts = self.sag.stylist_prompts("self_improve", self.data_cfg.stylist_input)
        sampling = GenerationConfig(
            max_new_tokens=opts.article_max_new_tokens,
            do_sample=True,
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k,
            batch_size=opts.generation_batch_size,
        )
        with torch.random.fork_rng(devices=[]):  # sampling leaves the training RNG streams untouched
            torch.manual_seed(self.stage.train.seed)
            samples = self.stylist().reply([p for p in prompts for _ in range(opts.candidates)], sampling)
        scores = self.sag.scorer().score(samples).tolist()
        n = opts.candidates
        result = filter_candidates(
            [samples[i * n : (i + 1) * n] for i in range(len(inputs))],
            [scores[i * n : (i + 1) * n] for i in range(len(inputs))],
            inputs,
            opts.filter,
            self.sag.claims,
        )
        kept = [
            {
                "id": inputs[i]["id"],
                "lang": inputs[i]["lang"],
                "prompt": prompts[i],
                "article": text,
                "style_score": s,
            }
            for i, text, s in result.kept
        ]
        self.round_stats = result.stats
        if self.ctx.is_main_process:
            _write_jsonl(out_dir / "kept.jsonl", kept)
            (out_dir / "stats.json").write_text(json.dumps(result.stats, indent=1))
            summary = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.stats.items()
            )
            print(f"[{self.stage.name}] self-improvement: {summary}")
        return kept

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
    Predictions, drafts and ``notebench.md`` go to ``output``. Returns ``{"notebench/{system}/...": v}``.
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
    sag = SAGStage(data, SAGOptions(systems=systems), ctx, drafter, needs_drafter, lambda: device)
    stylist = None
    if stylist_dir is not None:
        model, tokenizer = load_causal_lm(CausalLMConfig(), Path(stylist_dir))
        model.to(device)
        meta = Path(stylist_dir) / CHAT_META
        template = json.loads(meta.read_text())["template"] if meta.is_file() else "chatml"
        stylist = ChatLM(model, tokenizer, resolve_template(template, tokenizer))
    elif any(system != "llm_alone" for system in systems):
        raise ValueError(f"systems {systems} need a stylist: pass stylist_dir")
    return sag.benchmark(stylist)
