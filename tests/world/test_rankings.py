import pytest

from mmfactory.world import World
from mmfactory.world.captions import caption
from mmfactory.world.rankings import QUALITY, dense_ranks


def test_dense_ranks_with_ties():
    assert dense_ranks(["web_noise", "detailed", "brief", "incomplete", "unrelated", "wrong_attribute"]) == [
        4,
        1,
        2,
        2,
        4,
        3,
    ]


def test_rankings_put_the_exact_detailed_caption_first():
    w = World()
    for i, item in enumerate(w.rankings("train", 20)):
        scene = w.scene("train", i)
        best = [c for c, r in zip(item["captions"], item["ranks"], strict=True) if r == 1]
        assert best == [caption(scene, "en", "detailed")]
        assert (
            len(item["captions"]) == len(item["ranks"]) == len(item["kinds"]) == 6 - (len(scene.objects) == 1)
        )
        for kind, text, rank in zip(item["kinds"], item["captions"], item["ranks"], strict=True):
            assert (text == caption(scene, "en", "detailed")) == (kind == "detailed")
            assert rank == dense_ranks(list(QUALITY)).__getitem__(list(QUALITY).index(kind))


@pytest.mark.parametrize("bad_fraction", [0.0, 0.3, 0.75])
def test_web_pool_has_exactly_the_configured_bad_share(bad_fraction):
    pairs, truth = World().web_pool(40, bad_fraction)
    assert [p["uid"] for p in pairs] == [t["uid"] for t in truth]
    assert sum(not t["aligned"] for t in truth) == round(40 * bad_fraction)
    for p, t in zip(pairs, truth, strict=True):
        assert t["aligned"] == (t["kind"] in ("detailed", "brief"))
        assert p["image"].shape == (32, 32, 3) and p["text"]


def test_web_pool_aligned_text_describes_the_image():
    w = World()
    pairs, truth = w.web_pool(20, 0.5)
    for i, (p, t) in enumerate(zip(pairs, truth, strict=True)):
        scene_caption = caption(w.scene("pool", i), "en", t["kind"]) if t["aligned"] else None
        assert (p["text"] == scene_caption) == t["aligned"]


def test_image_preference_prefers_the_faithful_response():
    w = World()
    for i, item in enumerate(w.preference("train", 20)):
        assert item["prompt"].startswith("<image>\n") and item["chosen"] != item["rejected"]
        if item["prompt"].endswith("Describe the image in detail."):
            assert item["chosen"] == caption(w.scene("train", i), "en", "detailed")


def test_article_preference_rejects_a_hallucinated_note():
    item = World().preference("train", 1, source="article")[0]
    assert item["prompt"].startswith("Rewrite in note style:") and item["chosen"] != item["rejected"]
