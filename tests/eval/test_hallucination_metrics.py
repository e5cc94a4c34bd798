"""Hallucination rates on hand-made examples."""

import pytest

from mmfactory.eval.metrics import hallucination_rates, object_hallucination


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


def test_object_hallucination_hand_computed():
    mentioned = [["red star", "blue circle"], ["red star", "red star"], [], ["green ring"]]
    present = [["red star"], ["red star", "pink cross"], ["blue circle"], ["green ring"]]
    assert object_hallucination(mentioned, present) == pytest.approx(
        {
            "chair_i": 100 * 1 / 5,  # "blue circle" in the first reply; repeats count as mentions
            "chair_s": 100 * 1 / 4,
            "object_recall": 100 * 3 / 5,
            "num_mentions": 5,
        }
    )
    assert object_hallucination([[]], [["red star"]])["chair_i"] == 0.0  # silence: no rate, no recall
    with pytest.raises(ValueError, match="2 mention lists but 1"):
        object_hallucination([[], []], [[]])


def test_world_object_mentions_read_every_caption_of_the_world():
    from mmfactory.world import World
    from mmfactory.world.captions import object_mentions

    world = World(seed=0, image_size=16)
    for detail in ("brief", "detailed"):
        for pair, index in zip(world.pairs("test", 20, detail=detail), range(20), strict=True):
            scene = world.scene("test", index)
            assert sorted(object_mentions(pair["text"])) == sorted(o.name for o in scene.objects)
    assert object_mentions("Two Blue crosses and a pink square on a white background.") == [
        "blue cross",
        "pink square",
    ]
