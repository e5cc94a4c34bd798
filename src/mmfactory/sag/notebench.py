"""NoteBench-style scores of generated styled articles, per language, and the comparison table.

For each language (``en`` word-level, ``zh`` character-level):

* ``rouge_l``: ROUGE-L F1 against the reference article, x100;
* ``bleu4``: corpus BLEU-4 (sacrebleu's ``13a`` / ``zh`` tokenization), in [0, 100];
* ``factuality_rate``: percent of claims that contradict the source facts;
* ``faithfulness_rate``: percent of claims the source facts do not support;
* ``judged``: percent of texts in which the claim checker recognised at least one claim. When it
  recognised none in any text (or there is no checker), the two rates are *not judged*: they are left
  out (the table prints "not judged"), never reported as 0 %;
* ``fact_recall``: percent of source facts stated with their value (coverage: an empty article makes
  no claim, so read the two rates with it);
* ``style_score``: mean probability of the style scorer, x100 (when a scorer is given).

Claims are read from the generated text by a claim checker ``claims_fn(text, lang) -> {attribute:
value}`` (:func:`load_claim_checker`): ``world`` is the world's product vocabulary
(:func:`~mmfactory.world.articles.extract_claims`), which recognises nothing in text outside that
vocabulary; real data plugs in its own (``module:function``, e.g. a wrapper around an NLI model or a judge
LM that lists the attribute claims a text makes). Verdicts against the facts follow one rule
(:func:`~mmfactory.sag.self_improve.claim_verdicts`).
"""

from __future__ import annotations

import importlib
from typing import Any

from mmfactory.config import ConfigError
from mmfactory.eval.metrics import corpus_bleu, hallucination_rates, rouge_l
from mmfactory.sag.self_improve import ClaimsFn, fact_check
from mmfactory.sag.style import StyleScorer

METRICS = ("rouge_l", "bleu4", "factuality_rate", "faithfulness_rate", "judged", "fact_recall", "style_score")
HEADERS = ("ROUGE-L", "BLEU-4", "contradicted %", "unsupported %", "judged %", "fact recall %", "style %")
RATES = ("factuality_rate", "faithfulness_rate")


def load_claim_checker(spec: str | None) -> ClaimsFn | None:
    """The claim checker a config names: ``world`` (the world's product vocabulary), ``module:function``
    (an importable ``(text, lang) -> {attribute: value}``) or None (no checker: rates not judged)."""
    if spec is None:
        return None
    if spec == "world":
        from mmfactory.data.world_source import world_claims

        return world_claims
    module, _, name = spec.partition(":")
    try:
        checker = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            f"claim_checker: {spec!r} is not 'world' or an importable 'module:function' ({error})"
        ) from None
    if not callable(checker):
        raise ConfigError(f"claim_checker: {spec!r} is not callable")
    return checker


def notebench_scores(
    predictions: list[str],
    articles: list[dict[str, Any]],
    claims_fn: ClaimsFn | None,
    scorer: StyleScorer | None = None,
) -> dict[str, float]:
    """``{"{lang}/{metric}": value}`` for each language among ``articles`` (plus ``{lang}/num_samples``);
    ``claims_fn`` None: no claim checks (judged, fact recall and both rates left out)."""
    if len(predictions) != len(articles):
        raise ValueError(f"{len(predictions)} predictions for {len(articles)} articles")
    out: dict[str, float] = {}
    for lang in sorted({a["lang"] for a in articles}):
        rows = [i for i, a in enumerate(articles) if a["lang"] == lang]
        texts = [predictions[i] for i in rows]
        references = [articles[i]["reference"] for i in rows]
        facts = [articles[i]["facts"] for i in rows]
        scores = {
            "rouge_l": 100.0 * rouge_l(texts, references, lang)["f"],
            "bleu4": corpus_bleu(texts, references, tokenize="13a" if lang == "en" else "zh")["bleu"],
        }
        if claims_fn is not None:
            claims = [claims_fn(text, lang) for text in texts]
            rates = hallucination_rates(facts, claims)
            recall = [fact_check(c, f).recall for c, f in zip(claims, facts, strict=True)]
            scores["judged"] = 100.0 * sum(bool(c) for c in claims) / len(claims)
            if rates["num_claims"]:
                scores.update({name: rates[name] for name in RATES})
            scores["fact_recall"] = 100.0 * sum(recall) / len(recall)
        if scorer is not None:
            scores["style_score"] = 100.0 * float(scorer.score(texts).mean())
        out.update({f"{lang}/{name}": value for name, value in scores.items()})
        out[f"{lang}/num_samples"] = len(rows)
    return out


def comparison_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """A Markdown table, one line per ``(system label, lang, {metric: value})``."""
    lines = [
        "| system | lang | " + " | ".join(HEADERS) + " |",
        "|---|---|" + "---:|" * len(HEADERS),
    ]
    for label, lang, scores in rows:
        judged = "judged" not in scores or scores["judged"] > 0  # rows of older runs have no "judged"
        cells = [
            f"{scores[m]:.2f}" if m in scores else "not judged" if m in RATES and not judged else "-"
            for m in METRICS
        ]
        lines.append(f"| {label} | {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_from_metrics(metrics: dict[str, float]) -> list[tuple[str, str, dict[str, float]]]:
    """Table rows from metrics keyed ``[...]notebench/{system}/{lang}/{metric}`` (as the SAG stages log
        them, and as ``results.json`` holds them under ``{stage}/``), in first-seen order; rows are labelled
    ``"{stage}: {system}"`` or ``system``."""
    grouped: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        head, sep, tail = key.partition("notebench/")
        parts = tail.split("/")
        if not sep or len(parts) != 3:
            continue
        system, lang, metric = parts
        label = f"{head.rstrip('/')}: {system}" if head else system
        grouped.setdefault((label, lang), {})[metric] = value
    return [(label, lang, scores) for (label, lang), scores in grouped.items()]
