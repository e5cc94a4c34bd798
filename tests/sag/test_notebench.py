"""NoteBench scores on hand-made articles, and the comparison table built from logged metrics."""

import pytest

from mmfactory.sag.notebench import comparison_table, notebench_scores, rows_from_metrics
from mmfactory.world import extract_claims

EN = {
    "lang": "en",
    "facts": {"product": "Kiri", "category": "jacket", "color": "red", "price": "19"},
    "reference": "✨ Kiri jacket | obsessed ✨\n🎨 Red looks so good\n💰 Only $19!",
}
ZH = {
    "lang": "zh",
    "facts": {"product": "Kiri", "category": "夹克", "color": "红色"},
    "reference": "✨Kiri夹克｜真的爱了✨\n🎨红色颜值超高",
}


class _ConstantScorer:
    def score(self, texts):
        import numpy as np

        return np.full(len(texts), 0.25)


def test_perfect_predictions():
    scores = notebench_scores([EN["reference"], ZH["reference"]], [EN, ZH], extract_claims, _ConstantScorer())
    for lang in ("en", "zh"):
        assert scores[f"{lang}/rouge_l"] == pytest.approx(100.0)
        assert scores[f"{lang}/bleu4"] == pytest.approx(100.0)
        assert scores[f"{lang}/factuality_rate"] == 0.0 and scores[f"{lang}/faithfulness_rate"] == 0.0
        assert scores[f"{lang}/fact_recall"] == 100.0 and scores[f"{lang}/style_score"] == 25.0
        assert scores[f"{lang}/num_samples"] == 1


def test_hallucination_rates_on_hand_made_articles():
    contradicted = "✨ Kiri jacket ✨\n🎨 Blue looks so good\n💰 Only $19!"  # 4 claims, 1 contradicts
    unsupported = "✨ Kiri jacket ✨\n🎨 Red looks so good\n🧵 Wool feels amazing"  # 4 claims, 1 unsupported
    scores = notebench_scores([contradicted, unsupported], [EN, EN], extract_claims)
    assert scores["en/factuality_rate"] == pytest.approx(100 * 1 / 8)
    assert scores["en/faithfulness_rate"] == pytest.approx(100 * 1 / 8)
    assert scores["en/fact_recall"] == pytest.approx(100 * (3 / 4 + 3 / 4) / 2)  # each misses one fact
    assert "en/style_score" not in scores

    zh = notebench_scores(["✨Kiri夹克✨\n🎨黄色颜值超高\n🧵真皮材质"], [ZH], extract_claims)
    assert zh["zh/factuality_rate"] == pytest.approx(100 / 4) and zh["zh/faithfulness_rate"] == pytest.approx(
        100 / 4
    )
    # Character-level ROUGE-L for Chinese: a prediction sharing only "红色" with the reference scores > 0.
    assert notebench_scores(["红色"], [ZH], extract_claims)["zh/rouge_l"] > 0


def test_table_from_logged_metrics():
    metrics = {
        "s_sft/notebench/llm_alone/en/rouge_l": 10.0,
        "s_sft/notebench/llm+stylist/en/rouge_l": 50.0,
        "s_sft/notebench/llm+stylist/en/bleu4": 40.0,
        "s_sft/train_loss": 1.0,
    }
    rows = rows_from_metrics(metrics)
    assert rows == [
        ("s_sft: llm_alone", "en", {"rouge_l": 10.0}),
        ("s_sft: llm+stylist", "en", {"rouge_l": 50.0, "bleu4": 40.0}),
    ]
    table = comparison_table(rows).splitlines()
    assert len(table) == 4 and table[3].startswith("| s_sft: llm+stylist | en | 50.00 | 40.00 | - |")
