"""The settings of a SAG stage: the frozen drafter, the articles and how the stylist's data is made of them,
NoteBench's systems and generation lengths, and one self-improvement round's sampling and filter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmfactory.config import ConfigError
from mmfactory.data.chat import TemplateName
from mmfactory.data.sources import SourceConfig, check_fraction
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
        if not self.train:
            raise ConfigError("train: at least one source is required")
        check_fraction(self.max_bad_fraction)


@dataclass
class SAGOptions:
    """NoteBench systems to evaluate after training, generation lengths (greedy decoding), and LoRA."""

    systems: list[System] = field(default_factory=lambda: ["llm+stylist"])
    draft_max_new_tokens: int = 64
    article_max_new_tokens: int = 96
    generation_batch_size: int = 32
    lora: LoraOptions | None = None  # the stylist's LoRA adapters (as ``causal_lm_sft``'s ``options.lora``)

    def generation(self, what: Literal["draft", "article"]) -> GenerationConfig:
        tokens = self.draft_max_new_tokens if what == "draft" else self.article_max_new_tokens
        return GenerationConfig(max_new_tokens=tokens, batch_size=self.generation_batch_size)


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
