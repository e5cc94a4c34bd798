"""NoteBench-style scores of generated styled articles, per language, and the comparison table.

For each language (``en`` word-level, ``zh`` character-level):

* ``rouge_l``: ROUGE-L F1 against the reference article, x100;
* ``bleu4``: corpus BLEU-4 (sacrebleu's ``13a`` / ``zh`` tokenization), in [0, 100];
* ``factuality_rate``: percent of claims that contradict the source facts;
* ``faithfulness_rate``: percent of claims the source facts do not support;
* ``fact_recall``: percent of source facts stated with their value (coverage: an empty article makes
  no claim, so read the two rates with it);
* ``style_score``: mean probability of the style scorer, x100 (when a scorer is given).

Claims are read from the generated text by ``claims_fn(text, lang)``; the SAG stages pass the world's
:func:`~mmfactory.world.articles.extract_claims`, real data needs an extractor of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmfactory.eval.metrics import corpus_bleu, hallucination_rates, rouge_l
from mmfactory.sag.self_improve import fact_check
from mmfactory.sag.style import StyleScorer

METRICS = ("rouge_l", "bleu4", "factuality_rate", "faithfulness_rate", "fact_recall", "style_score")
HEADERS = ("ROUGE-L", "BLEU-4", "contradicted %", "unsupported %", "fact recall %", "style %")


def notebench_scores(
    predictions: list[str],
    articles: list[dict[str, Any]],
    claims_fn: Callable[[str, str], dict[str, str]],
    scorer: StyleScorer | None = None,
) -> dict[str, float]:
    """``{"{lang}/{metric}": value}`` for each language among ``articles`` (plus ``{lang}/num_samples``)."""
    if len(predictions) != len(articles):
        raise ValueError(f"{len(predictions)} predictions for {len(articles)} articles")
    out: dict[str, float] = {}
    for lang in sorted({a["lang"] for a in articles}):
        rows = [i for i, a in enumerate(articles) if a["lang"] == lang]
        texts = [predictions[i] for i in rows]
        references = [articles[i]["reference"] for i in rows]
        facts = [articles[i]["facts"] for i in rows]
        claims = [claims_fn(text, lang) for text in texts]
        rates = hallucination_rates(facts, claims)
        recall = [fact_check(c, f).recall for c, f in zip(claims, facts, strict=True)]
        scores = {
            "rouge_l": 100.0 * rouge_l(texts, references, lang)["f"],
            "bleu4": corpus_bleu(texts, references, tokenize="13a" if lang == "en" else "zh")["bleu"],
            "factuality_rate": rates["factuality_rate"],
            "faithfulness_rate": rates["faithfulness_rate"],
            "fact_recall": 100.0 * sum(recall) / len(recall),
        }
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
        cells = [f"{scores[m]:.2f}" if m in scores else "-" for m in METRICS]
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
