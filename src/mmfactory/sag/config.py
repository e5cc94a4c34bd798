"""The settings of a SAG stage: the frozen drafter, the articles and how the stylist's data is made of them,
NoteBench's systems and generation lengths, and one self-improvement round's sampling and filter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmfactory.config import ConfigError
from mmfactory.data.chat import TemplateName
from mmfactory.data.source_config import SourceConfig, check_sources
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.lm import CausalLMConfig
from mmfactory.models.lora import LoraOptions
from mmfactory.sag.data import SAGPrompts
from mmfactory.sag.pipeline import System
from mmfactory.sag.self_improve import FilterConfig
from mmfactory.sag.style import StyleScorerConfig

Split = Literal["train", "eval", "benchmark", "benchmark_needs_llm", "self_improve"]
BENCHMARKS = {"benchmark": "", "benchmark_needs_llm": "@needs_llm"}  # split -> suffix of its systems' rows


@dataclass
class DrafterConfig(CausalLMConfig):
    """The frozen LLM. ``path``: a local folder or the name of an earlier stage (e.g. the tiny stand-in
    LLM); a GGUF file: ``gguf_file`` absolute, or inside ``path``, or inside the installed Python package
    ``gguf_package``; ``tiny`` for tests."""

    template: TemplateName = "chatml"
    system: str | None = None  # a system turn before every request


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
        check_sources(self.train, self.max_bad_fraction)


@dataclass
class SAGGenerationOptions:
    """Lengths and batch size of the SAG pipeline's greedy generation: the frozen LLM's drafts and the
    articles NoteBench scores (the LLM's, the stylist's); self-improvement samples articles of the same
    length in batches of the same size."""

    draft_max_new_tokens: int = 64
    article_max_new_tokens: int = 96
    batch_size: int = 32

    def validate(self) -> None:
        for name in ("draft_max_new_tokens", "article_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")

    def greedy(self, what: Literal["draft", "article"]) -> GenerationConfig:
        """Greedy decoding of a draft or an article."""
        tokens = self.draft_max_new_tokens if what == "draft" else self.article_max_new_tokens
        return GenerationConfig(max_new_tokens=tokens, batch_size=self.batch_size)


@dataclass
class SAGSamplingOptions:
    """How one self-improvement round samples the stylist: ``candidates`` articles per input, at
    ``temperature`` with nucleus (``top_p``) and top-k filtering (null: off)."""

    candidates: int = 4
    temperature: float = 1.0
    top_p: float | None = 0.95
    top_k: int | None = None

    def validate(self) -> None:
        if self.candidates < 1:
            raise ConfigError(f"candidates: must be >= 1, got {self.candidates}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0 to sample, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1] (null: off), got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k: must be >= 1 (null: off), got {self.top_k}")


@dataclass
class SAGOptions:
    """A stylist S-SFT stage: the NoteBench systems evaluated after training, the generation settings
    (``generation``), and LoRA on the stylist (as ``causal_lm_sft``'s ``options.lora``)."""

    systems: list[System] = field(default_factory=lambda: ["llm+stylist"])
    generation: SAGGenerationOptions = field(default_factory=SAGGenerationOptions)
    lora: LoraOptions | None = None


@dataclass
class SelfImproveOptions:
    """One self-improvement round: the S-SFT stage's groups (``systems``, ``generation``, ``lora``), how
    the stylist samples new inputs (``sampling``) and which samples are kept (``filter``: style + facts).

    ``previous_rounds``: earlier self-improvement stages whose kept samples also join the data.
    """

    systems: list[System] = field(default_factory=lambda: ["llm+stylist"])
    generation: SAGGenerationOptions = field(default_factory=SAGGenerationOptions)
    lora: LoraOptions | None = None
    sampling: SAGSamplingOptions = field(default_factory=SAGSamplingOptions)
    filter: FilterConfig = field(default_factory=FilterConfig)
    previous_rounds: list[str] = field(default_factory=list)
