"""The self-improvement filter keeps exactly the candidates that pass both the style and the fact check."""

import pytest

from mmfactory.eval.metrics import hallucination_rates
from mmfactory.sag.self_improve import FilterConfig, fact_check, filter_candidates
from mmfactory.world import extract_claims

FACTS = {"product": "Kiri", "category": "jacket", "color": "red", "price": "19"}


def test_fact_check_counts_like_notebench():
    claims = {"product": "Kiri", "category": "Jacket", "color": "blue", "material": "wool"}
    check = fact_check(claims, FACTS)
    assert (check.contradicted, check.unsupported, check.recall) == (1, 1, 0.5)
    rates = hallucination_rates([FACTS], [claims])
    assert rates["factuality_rate"] == 25.0 and rates["faithfulness_rate"] == 25.0
    assert fact_check({}, FACTS).passed(0.0) and not fact_check({}, FACTS).passed(0.5)
    assert fact_check({k: v.upper() for k, v in FACTS.items()}, FACTS).passed(1.0)


FAITHFUL = "✨ Kiri jacket | obsessed ✨\n🎨 Red looks so good\n💰 Only $19!\n#Kiri #jacket"
FAITHFUL_2 = "✨ Kiri jacket | my new favorite ✨\n🎨 The red shade is gorgeous\n💰 Just $19, what a deal"
PARTIAL = "✨ Kiri jacket ✨\n🎨 Red looks so good"  # no price: recall 3/4
CONTRADICTED = "✨ Kiri jacket ✨\n🎨 Blue looks so good\n💰 Only $19!"
UNSUPPORTED = "✨ Kiri jacket ✨\n🎨 Red looks so good\n🧵 Wool feels amazing\n💰 Only $19!"


@pytest.mark.parametrize("min_recall", [1.0, 0.75])
def test_filter_keeps_exactly_what_passes_both_checks(min_recall):
    texts = [[FAITHFUL, CONTRADICTED, FAITHFUL_2, PARTIAL, FAITHFUL], [UNSUPPORTED, FAITHFUL]]
    scores = [[0.9, 0.95, 0.4, 0.8, 0.9], [0.99, 0.3]]  # FAITHFUL_2 and input 1's FAITHFUL fail the style
    inputs = [{"lang": "en", "facts": FACTS}, {"lang": "en", "facts": FACTS}]
    cfg = FilterConfig(min_style_score=0.5, min_fact_recall=min_recall, keep_per_input=10)
    result = filter_candidates(texts, scores, inputs, cfg, extract_claims)

    passing = {(0, FAITHFUL, 0.9)} | ({(0, PARTIAL, 0.8)} if min_recall < 1 else set())
    assert set(result.kept) == passing  # the duplicate FAITHFUL is kept once
    assert result.stats["candidates"] == 7 and result.stats["passed_style"] == 5
    assert result.stats["passed_facts"] == 4 + (min_recall < 1)
    assert result.stats["passed_both"] == 2 + (min_recall < 1)
    assert result.stats["rejected"] == 7 - result.stats["passed_both"]
    assert result.stats["inputs_with_kept"] == 1
    assert result.stats["mean_style_score"] == pytest.approx(sum(map(sum, scores)) / 7)

    best = filter_candidates(
        texts, scores, inputs, FilterConfig(0.5, min_recall, keep_per_input=1), extract_claims
    )
    assert best.kept == [(0, FAITHFUL, 0.9)]  # the highest style score among those passing


def test_chinese_candidates():
    facts = {"product": "Kiri", "category": "夹克", "color": "红色"}
    texts = [["✨Kiri夹克✨\n🎨红色颜值超高", "✨Kiri夹克✨\n🎨黄色颜值超高"]]
    result = filter_candidates(
        texts, [[0.9, 0.9]], [{"lang": "zh", "facts": facts}], FilterConfig(), extract_claims
    )
    assert [text for _, text, _ in result.kept] == [texts[0][0]]


def test_claim_verdicts_follow_notebench_normalisation_and_fact_check_counts_them():
    from mmfactory.sag.self_improve import claim_verdicts

    facts = {"Color": "Red ", "price": "49"}
    claims = {"color": "red", "price": "59", "material": "ceramic"}
    assert claim_verdicts(claims, facts) == {
        "color": "stated",
        "price": "contradicted",
        "material": "unsupported",
    }
    check = fact_check(claims, facts)
    assert (check.contradicted, check.unsupported, check.recall) == (1, 1, 0.5)
