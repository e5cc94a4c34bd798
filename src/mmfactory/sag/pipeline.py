"""The SAG collaboration: a frozen LLM writes a neutral draft from the source facts, the stylist rewrites
it in the target style. Both run batched through :func:`~mmfactory.models.generation.generate_replies`;
the two models exchange text only, so they need not share a tokenizer.

NoteBench's systems:

* ``llm_alone``: the LLM, instructed to write in the style (``prompts.llm_style``);
* ``stylist_alone``: the stylist writes from the facts (``prompts.direct``), trained that way;
* ``llm+stylist``: the LLM drafts (``prompts.draft``), the stylist rewrites (``prompts.stylize``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmfactory.data.chat import ChatTemplate
from mmfactory.models.generation import GenerationConfig, generate_replies
from mmfactory.sag.data import SAGPrompts, fill

System = Literal["llm_alone", "stylist_alone", "llm+stylist"]
DraftSource = Literal["given", "facts", "article"]


@dataclass
class ChatLM:
    """A chat model ready for batched generation: one user turn per prompt, after ``system`` if set."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate
    system: str | None = None

    def reply(self, prompts: list[str], cfg: GenerationConfig) -> list[str]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        conversations = [[*head, {"role": "user", "content": prompt}] for prompt in prompts]
        return generate_replies(self.model, self.tokenizer, self.template, conversations, cfg)


def write_drafts(
    drafter: ChatLM,
    articles: list[dict[str, Any]],
    prompts: SAGPrompts,
    source: Literal["facts", "article"],
    cfg: GenerationConfig,
) -> list[str]:
    """Neutral drafts by the frozen LLM, from each article's facts or from its styled ``reference``."""
    if source == "facts":
        requests = [fill(prompts.draft, a) for a in articles]
    else:
        requests = [fill(prompts.neutralize, a, article=a["reference"]) for a in articles]
    return drafter.reply(requests, cfg)


def stylist_prompts(
    articles: list[dict[str, Any]],
    drafts: list[str] | None,
    prompts: SAGPrompts,
    stylist_input: Literal["draft", "facts"],
) -> list[str]:
    """The stylist's user turns: the draft to restyle, or the facts (the stylist-alone baseline)."""
    if stylist_input == "facts":
        return [fill(prompts.direct, a) for a in articles]
    if drafts is None or len(drafts) != len(articles):
        raise ValueError("the stylist's draft input needs one draft per article")
    return [fill(prompts.stylize, a, draft=d) for a, d in zip(articles, drafts, strict=True)]
