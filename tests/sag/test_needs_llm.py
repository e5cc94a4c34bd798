"""SAG's split that needs the LLM, and hallucination rates that say when they cannot judge.

* The world's ``article_requests`` carry the test articles' facts (the truth NoteBench checks) as a seller's
  message that states exactly those facts, in wording no drafting instruction, draft or note uses; in
  ``sag/tiny`` only the LLM's training data holds such messages, never the small LM's or a stylist's.
* A text in which the checker recognises no claim is "not judged", not 0 % hallucinated; a pluggable
  checker (``module:function``) is called on every prediction with its language, and its claims are
  judged against the facts by NoteBench's rule; a bad checker is refused before training.
"""

from collections import Counter

import pytest

from mmfactory.config import ConfigError, load_recipe
from mmfactory.data.readers.articles import read_articles
from mmfactory.data.sources import read_sources
from mmfactory.recipes import resolve_recipe
from mmfactory.sag.data import SAGPrompts, fill
from mmfactory.sag.notebench import comparison_table, load_claim_checker, notebench_scores, rows_from_metrics
from mmfactory.tasks import validate_stage
from mmfactory.world.articles import REQUEST, SMALL_TALK, article, extract_claims, request_article

CALLS: list[tuple[str, str]] = []


def recording_checker(text: str, lang: str) -> dict[str, str]:
    """A stand-in for an NLI / judge-LM checker: claims every text is about a red product."""
    CALLS.append((text, lang))
    return {"color": "red" if lang == "en" else "红色"}


def _request_markers(lang: str) -> list[str]:
    """Phrases only a seller's message has (the fixed parts of its wordings, and the small talk)."""
    fixed = [w.split("{")[0] for wordings in REQUEST[lang].values() for w in wordings if w.split("{")[0]]
    return [m for m in fixed if len(m) >= 3] + list(SMALL_TALK[lang])


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_request_states_the_test_articles_facts_in_other_words(lang):
    for i in range(20):
        plain, request = article(0, "test", i, lang), request_article(0, "test", i, lang)
        assert {k: v for k, v in request.items() if k != "input"} == plain
        assert extract_claims(request["input"], lang) == plain["facts"]
        assert request["input"] not in (plain["draft"], plain["reference"])
        assert any(m in request["input"] for m in _request_markers(lang))
        prompts = SAGPrompts()
        assert request["input"] in fill(prompts.draft, request)  # the systems get the message...
        assert "\n".join(f"{k}: {v}" for k, v in plain["facts"].items()) in fill(prompts.draft, plain)


def test_in_sag_tiny_only_the_llm_ever_reads_a_sellers_message():
    recipe = load_recipe(resolve_recipe("sag/tiny"))
    markers = [m for lang in ("en", "zh") for m in _request_markers(lang)]
    seen = {}
    for i, stage in enumerate(recipe.stages):
        cls, _, data_cfg, _ = validate_stage(stage, i)
        if cls.sample_kind == "chat":
            texts = [
                m["content"]
                for c in read_sources(data_cfg.train, "chat", Counter(), "train").messages
                for m in c
            ]
        else:  # the stylists train on the articles' facts and drafts, and sample on self-improvement inputs
            splits = [data_cfg.train, data_cfg.self_improve or []]
            items = [a for sources in splits for a in read_sources(sources, "article", Counter(), "x").items]
            assert all("input" not in a for a in items)
            texts = [t for a in items for t in (a["draft"], a["reference"], *a["facts"].values())]
            benchmark = read_sources(data_cfg.benchmark_needs_llm, "article", Counter(), "test").items
            assert len(benchmark) == 200 and all(a["input"] for a in benchmark)
        seen[stage.name] = sum(any(m in t for m in markers) for t in texts)
    assert seen.pop("llm") >= 1600 and set(seen.values()) == {0}, seen


def test_text_without_recognised_claims_is_not_judged():
    facts = {"product": "Kiri", "category": "jacket", "color": "red"}
    articles = [{"lang": "en", "facts": facts, "reference": "a note"}] * 2
    scores = notebench_scores(["Lovely weather today.", "Nothing to say."], articles, extract_claims)
    assert scores["en/judged"] == 0.0 and "en/factuality_rate" not in scores
    assert "en/faithfulness_rate" not in scores and scores["en/fact_recall"] == 0.0
    half = notebench_scores(["Lovely weather today.", "The Kiri jacket in blue."], articles, extract_claims)
    assert half["en/judged"] == 50.0 and half["en/factuality_rate"] == pytest.approx(100 / 3)
    rows = rows_from_metrics({f"notebench/llm_alone/{k}": v for k, v in scores.items()})
    assert "| not judged | not judged | 0.00 |" in comparison_table(rows)
    assert "en/judged" not in notebench_scores(["x"], articles[:1], None)  # no checker at all


def test_a_plugged_checker_is_called_on_every_prediction_and_judged_by_notebench_rule():
    checker = load_claim_checker(f"{__name__}:recording_checker")
    CALLS.clear()
    en = {"lang": "en", "facts": {"product": "Kiri", "color": "blue"}, "reference": "r"}
    zh = {"lang": "zh", "facts": {"product": "Kiri", "material": "陶瓷"}, "reference": "r"}
    scores = notebench_scores(["text one", "文本二"], [en, zh], checker)
    assert CALLS == [("text one", "en"), ("文本二", "zh")]
    assert scores["en/factuality_rate"] == 100.0 and scores["en/faithfulness_rate"] == 0.0  # red vs blue
    assert scores["zh/factuality_rate"] == 0.0 and scores["zh/faithfulness_rate"] == 100.0  # no colour fact
    for bad in ("no_such_module:f", f"{__name__}:missing", f"{__name__}:CALLS"):
        with pytest.raises(ConfigError, match="claim_checker"):
            load_claim_checker(bad)
    assert load_claim_checker(None) is None and load_claim_checker("world")("Kiri", "en") == {
        "product": "Kiri"
    }


def test_article_files_may_give_the_systems_free_text_instead_of_the_facts(tmp_path):
    path = tmp_path / "articles.jsonl"
    path.write_text(
        '{"id": 1, "lang": "en", "facts": {"product": "Kiri"}, "reference": "r", "input": "selling a Kiri"}\n'
        '{"id": 2, "lang": "en", "facts": {"product": "Kiri"}, "reference": "r"}\n'
    )
    first, second = read_articles(path)[0], read_articles(path)[1]
    assert first["input"] == "selling a Kiri" and "input" not in second
    assert fill({"en": "facts:\n{facts}"}, first) == "facts:\nselling a Kiri"
    assert fill({"en": "facts:\n{facts}"}, second) == "facts:\nproduct: Kiri"
