"""Hallucination rates on hand-made examples."""

import pytest

from mmfactory.eval.metrics import hallucination_rates


def test_hallucination_rates_hand_computed():
    sources = [
        {"color": "red", "battery": "30 hours", "weight": "200 g"},
        {"color": "blue", "price": "$10"},
        {"material": "steel"},
        {"color": "green"},
    ]
    claims = [
        {"color": "Red ", "battery": "20 hours"},  # 1 contradiction (case/space-insensitive match on color)
        {"Color": "blue", "warranty": "2 years", "price": "$12"},  # 1 unsupported, 1 contradiction
        {},  # no claims
        {"color": "green", "size": "XL"},  # 1 unsupported
    ]
    assert hallucination_rates(sources, claims) == pytest.approx(
        {
            "factuality_rate": 100 * 2 / 7,
            "faithfulness_rate": 100 * 2 / 7,
            "sample_factuality_rate": 100 * 2 / 4,
            "sample_faithfulness_rate": 100 * 2 / 4,
            "sample_hallucination_rate": 100 * 3 / 4,
            "num_claims": 7,
            "num_samples": 4,
        }
    )


def test_hallucination_rates_with_zero_claims_are_zero():
    result = hallucination_rates([{"color": "red"}], [{}])
    assert result["num_claims"] == 0
    assert (
        result["factuality_rate"] == result["faithfulness_rate"] == result["sample_hallucination_rate"] == 0.0
    )
