"""SAG prompts: how the facts, drafts and styled articles of ``article`` samples (read by the data-source
layer) become the user turns of the frozen LLM and of the stylist, and C-DPO's hallucinated negatives.

An article is ``{"id", "lang", "facts": {attribute: value}, "draft", "reference"}`` and optionally
``"input"`` (the JSONL format of docs/formats.md; world articles also carry ``"variants"``). ``draft`` is
the neutral text, ``reference`` the styled article and ``input`` free text the systems are given instead of
the fact list (a seller's message, say), the facts staying what the article is checked against. Styled-only
corpora may leave ``draft`` out (the frozen LLM writes it from the reference) and ``facts`` out (no fact
check or C-DPO negatives are possible then).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmfactory.config import ConfigError

LANGS: tuple[str, ...] = ("en", "zh")


@dataclass
class SAGPrompts:
    """User-turn templates, one per language. ``{facts}`` is the facts as ``attribute: value`` lines,
    ``{draft}`` a neutral draft and ``{article}`` a styled article.

    The defaults match the instructions of the world's chat data, so the tiny stand-in LLM knows
    ``draft``; ``llm_style`` (the "LLM alone" baseline) spells the target style out instead.
    """

    draft: dict[str, str] = field(  # frozen LLM: facts -> neutral draft
        default_factory=lambda: {
            "en": "Write a product description from these facts:\n{facts}",
            "zh": "根据以下信息写一段产品介绍：\n{facts}",
        }
    )
    neutralize: dict[str, str] = field(  # frozen LLM: styled article -> neutral draft (style data)
        default_factory=lambda: {
            "en": "Rewrite this post as a plain, neutral product description without emoji or hashtags:"
            "\n{article}",
            "zh": "把这篇笔记改写成平实客观的产品介绍，不要表情和话题标签：\n{article}",
        }
    )
    stylize: dict[str, str] = field(  # stylist: draft -> styled article
        default_factory=lambda: {"en": "Rewrite in note style:\n{draft}", "zh": "改写成笔记风格：\n{draft}"}
    )
    direct: dict[str, str] = field(  # stylist alone: facts -> styled article
        default_factory=lambda: {
            "en": "Write a note about the product from these facts:\n{facts}",
            "zh": "根据以下信息写一篇产品笔记：\n{facts}",
        }
    )
    llm_style: dict[str, str] = field(  # LLM alone, instructed to write in the target style
        default_factory=lambda: {
            "en": "Write a social-media note about the product from these facts: a title line with "
            "emoji, then one short line starting with an emoji per fact, a closing line and hashtags."
            "\n{facts}",
            "zh": "根据以下信息写一篇社交平台笔记：带表情的标题，每条信息一行并以表情开头，"
            "再写一句结尾和话题标签。\n{facts}",
        }
    )

    def validate(self) -> None:
        for name in ("draft", "neutralize", "stylize", "direct", "llm_style"):
            missing = [lang for lang in LANGS if lang not in getattr(self, name)]
            if missing:
                raise ConfigError(f"{name}: no template for {', '.join(missing)}")


def render_facts(facts: dict[str, str]) -> str:
    """``attribute: value`` lines, in the order given."""
    return "\n".join(f"{key}: {value}" for key, value in facts.items())


def fill(templates: dict[str, str], article: dict[str, Any], /, **fields: str) -> str:
    """The template of the article's language filled with ``fields`` and ``{facts}``: the article's
    ``input`` (free text such as a seller's message) when it has one, else its facts as lines."""
    template = templates[article["lang"]]
    if "{facts}" in template:
        fields["facts"] = article.get("input") or render_facts(article["facts"])
    return template.format(**fields)


def hallucinated_article(article: dict[str, Any], index: int, pool: list[dict[str, Any]]) -> str | None:
    """A C-DPO negative: the styled article with a fact added or contradicted (``None`` if none can be made).

    World articles carry such variants: even ``index`` takes the one with an unsupported (added) fact,
    odd the contradicted one. Other articles get a contradiction: the value of one fact that appears
    verbatim in the reference is replaced everywhere by another value of that attribute from ``pool``
    (articles in the same language); which fact and which value is decided by ``index``.
    """
    variants = article.get("variants")
    if variants:
        return variants["unsupported" if index % 2 == 0 else "contradicted"]
    reference, facts = article["reference"], article["facts"]
    attributes = sorted(a for a, v in facts.items() if v in reference)
    for shift in range(len(attributes)):
        attribute = attributes[(index + shift) % len(attributes)]
        others = sorted(
            {p["facts"][attribute] for p in pool if p["lang"] == article["lang"] and attribute in p["facts"]}
            - {facts[attribute]}
        )
        others = [v for v in others if v not in reference]
        if others:
            return reference.replace(facts[attribute], others[index % len(others)])
    return None
