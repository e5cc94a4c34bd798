"""SAG self-improvement filter: keep the stylist's own samples that are in style and faithful.

For each input the stylist samples ``N`` candidates. A candidate passes the **style check** when the
style scorer gives it at least ``min_style_score``, and the **fact check** when, against the source
facts, it makes no contradicted and no unsupported claim (counted as NoteBench's hallucination rates
count them) and states at least ``min_fact_recall`` of the facts. Of the distinct candidates passing
both, the ``keep_per_input`` with the highest style score are kept and join the S-SFT data of the next
round.

A round is prepared once per stage (:func:`sample_round`) into the artifact ``self_improve/``
(:mod:`mmfactory.artifacts`): ``kept.jsonl`` (one ``{"id", "lang", "prompt", "article", "style_score"}``
per kept sample) and ``stats.json`` (the filter's counts and mean scores); later rounds read its kept
samples (:func:`read_kept`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmfactory.models.generation import GenerationConfig

if TYPE_CHECKING:
    from mmfactory.sag.pipeline import ChatLM
    from mmfactory.sag.style import StyleScorer

ClaimsFn = Callable[[str, str], dict[str, str]]  # (text, lang) -> {attribute: value}


@dataclass
class FilterConfig:
    """Thresholds of the filter (the paper names the checks, not their thresholds)."""

    min_style_score: float = 0.5
    min_fact_recall: float = 1.0  # share of the source facts a kept candidate must state correctly
    keep_per_input: int = 1


@dataclass(frozen=True)
class FactCheck:
    contradicted: int  # claims whose attribute is in the facts with another value
    unsupported: int  # claims whose attribute is not in the facts
    recall: float  # share of the facts claimed with their value (1.0 for no facts)

    def passed(self, min_recall: float) -> bool:
        return self.contradicted == 0 and self.unsupported == 0 and self.recall >= min_recall


def _normalize(text: str) -> str:
    return text.strip().casefold()


def claim_verdicts(claims: dict[str, str], facts: dict[str, str]) -> dict[str, str]:
    """Each claim's verdict against the source facts, ``"stated"``, ``"contradicted"`` or
    ``"unsupported"``, with NoteBench's rule (:func:`hallucination_rates`: keys and values compared after
    ``strip().casefold()``)."""
    source = {_normalize(key): _normalize(value) for key, value in facts.items()}
    verdicts = {}
    for key, value in claims.items():
        source_value = source.get(_normalize(key))
        if source_value is None:
            verdicts[key] = "unsupported"
        else:
            verdicts[key] = "stated" if source_value == _normalize(value) else "contradicted"
    return verdicts


def fact_check(claims: dict[str, str], facts: dict[str, str]) -> FactCheck:
    """Counts of :func:`claim_verdicts` and the share of the facts stated."""
    verdicts = list(claim_verdicts(claims, facts).values())
    stated = verdicts.count("stated")
    return FactCheck(
        verdicts.count("contradicted"), verdicts.count("unsupported"), stated / len(facts) if facts else 1.0
    )


@dataclass
class FilterResult:
    """``kept``: ``(input index, text, style score)``; ``stats``: counts and mean scores of the round."""

    kept: list[tuple[int, str, float]]
    stats: dict[str, float]


def filter_candidates(
    candidates: list[list[str]],
    style_scores: list[list[float]],
    inputs: list[dict],
    cfg: FilterConfig,
    claims_fn: ClaimsFn,
) -> FilterResult:
    """Apply both checks to ``candidates[i][j]`` (input ``i``'s ``j``-th sample, style score
    ``style_scores[i][j]``) against ``inputs[i]["facts"]`` in ``inputs[i]["lang"]``."""
    kept: list[tuple[int, str, float]] = []
    counts = dict.fromkeys(("candidates", "passed_style", "passed_facts", "passed_both"), 0)
    score_sum = kept_score_sum = 0.0
    for i, (texts, scores, source) in enumerate(zip(candidates, style_scores, inputs, strict=True)):
        passing: dict[str, float] = {}
        for text, score in zip(texts, scores, strict=True):
            style_ok = score >= cfg.min_style_score
            facts_ok = fact_check(claims_fn(text, source["lang"]), source["facts"]).passed(
                cfg.min_fact_recall
            )
            counts["candidates"] += 1
            counts["passed_style"] += style_ok
            counts["passed_facts"] += facts_ok
            counts["passed_both"] += style_ok and facts_ok
            score_sum += score
            if style_ok and facts_ok:
                passing[text] = score
        best = sorted(passing.items(), key=lambda item: -item[1])[: cfg.keep_per_input]
        kept += [(i, text, score) for text, score in best]
        kept_score_sum += sum(score for _, score in best)
    stats: dict[str, float] = {
        **counts,
        "kept": len(kept),
        "inputs": len(inputs),
        "inputs_with_kept": len({i for i, _, _ in kept}),
        "rejected": counts["candidates"] - counts["passed_both"],
        "mean_style_score": score_sum / max(counts["candidates"], 1),
        "mean_kept_style_score": kept_score_sum / max(len(kept), 1),
    }
    return FilterResult(kept, stats)


ROUND_ARTIFACT = "self_improve"
KEPT_FILE, STATS_FILE = "kept.jsonl", "stats.json"


def sample_round(
    stylist: ChatLM,
    prompts: list[str],
    inputs: list[dict[str, Any]],
    candidates: int,
    sampling: GenerationConfig,
    seed: int,
    scorer: StyleScorer,
    cfg: FilterConfig,
    claims_fn: ClaimsFn,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """``candidates`` samples of ``stylist`` for each of ``prompts`` (the stylist's turns for ``inputs``),
    drawn after ``torch.manual_seed(seed)``, and those the filter keeps: ``(kept records, stats)``."""
    torch.manual_seed(seed)
    samples = stylist.reply([p for p in prompts for _ in range(candidates)], sampling)
    scores = scorer.score(samples).tolist()
    n = candidates
    result = filter_candidates(
        [samples[i * n : (i + 1) * n] for i in range(len(inputs))],
        [scores[i * n : (i + 1) * n] for i in range(len(inputs))],
        inputs,
        cfg,
        claims_fn,
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
    return kept, result.stats


def write_round(folder: Path, kept: list[dict[str, Any]], stats: dict[str, float]) -> None:
    """The files of a round's artifact, written into ``folder``."""
    (folder / KEPT_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    (folder / STATS_FILE).write_text(json.dumps(stats, indent=1))


def read_kept(folder: Path) -> list[dict[str, Any]]:
    """The kept samples of the round artifact ``folder``."""
    return [json.loads(line) for line in (folder / KEPT_FILE).read_text().splitlines()]


def read_stats(folder: Path) -> dict[str, float]:
    return json.loads((folder / STATS_FILE).read_text())
