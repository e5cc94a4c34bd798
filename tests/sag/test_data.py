"""SAG data: C-DPO negatives, styled-article JSONL, prompts and the collaboration's draft/restyle flow."""

import json

import pytest

from mmfactory.data.policy import BadSampleCounter, BadSampleError
from mmfactory.data.readers import read_articles
from mmfactory.data.world_source import world_articles
from mmfactory.sag.data import SAGPrompts, fill, hallucinated_article
from mmfactory.sag.pipeline import stylist_prompts, write_drafts
from mmfactory.world import extract_claims


def test_world_negatives_add_or_contradict_a_fact():
    articles = world_articles("train", 4, 0, ["en", "zh"]).items
    for i, a in enumerate(articles):
        claims = extract_claims(hallucinated_article(a, i, articles), a["lang"])
        extra = set(claims) - set(a["facts"])
        changed = {k for k in a["facts"] if claims.get(k) != a["facts"][k]}
        assert (len(extra), len(changed)) == ((1, 0) if i % 2 == 0 else (0, 1))


def test_jsonl_negatives_swap_a_fact_value_from_the_pool():
    pool = [
        {"lang": "en", "facts": {"color": "red", "size": "large"}, "reference": "A red bag, large."},
        {"lang": "en", "facts": {"color": "teal", "size": "small"}, "reference": "A teal bag."},
        {"lang": "zh", "facts": {"color": "蓝色"}, "reference": "蓝色的包"},
    ]
    assert hallucinated_article(pool[0], 0, pool) == "A teal bag, large."  # sorted attributes: color
    assert hallucinated_article(pool[0], 1, pool) == "A red bag, small."  # then size
    assert hallucinated_article(pool[2], 0, pool) is None  # no other Chinese colour to swap in


def test_styled_articles_jsonl(tmp_path):
    rows = [
        {"id": 1, "lang": "en", "reference": "✨ styled ✨"},
        {"id": "b", "lang": "zh", "facts": {"color": "红色"}, "draft": "红色。", "reference": "🎨红色"},
        {"id": "c", "lang": "fr", "reference": "x"},
        {"id": "d", "lang": "en", "draft": " ", "reference": "y"},
    ]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counter = BadSampleCounter()
    records = read_articles(path, on_bad_sample="skip", counter=counter)
    articles = [records[i] for i in range(len(records))]
    assert [a["id"] for a in articles] == ["1", "b"]
    assert articles[0]["draft"] is None and articles[0]["facts"] == {}
    assert counter.summary() == {"empty_text": 1, "invalid_record": 1}
    with pytest.raises(BadSampleError, match="line 3"):
        read_articles(path)


class _EchoLM:
    """Stands in for a ChatLM: records the prompts, replies with a tag and the prompt's last line."""

    def __init__(self, tag):
        self.tag, self.prompts = tag, []

    def reply(self, prompts, cfg):
        self.prompts += prompts
        return [f"{self.tag}:{p.splitlines()[-1]}" for p in prompts]


def test_drafts_come_from_the_llm_and_feed_the_stylist():
    articles = world_articles("test", 1, 0, ["en", "zh"]).items
    prompts = SAGPrompts()
    llm = _EchoLM("draft")
    drafts = write_drafts(llm, articles, prompts, "facts", cfg=None)
    facts = "\n".join(f"{k}: {v}" for k, v in articles[0]["facts"].items())
    assert (
        llm.prompts[0]
        == fill(prompts.draft, articles[0])
        == f"Write a product description from these facts:\n{facts}"
    )
    assert llm.prompts[1].startswith("根据以下信息写一段产品介绍：\nproduct: ")
    assert drafts == [f"draft:{p.splitlines()[-1]}" for p in llm.prompts]

    neutralized = write_drafts(_EchoLM("n"), articles, prompts, "article", cfg=None)
    assert neutralized[0] == "n:" + articles[0]["reference"].splitlines()[-1]

    restyle = stylist_prompts(articles, drafts, prompts, "draft")
    assert restyle == [f"Rewrite in note style:\n{drafts[0]}", f"改写成笔记风格：\n{drafts[1]}"]
    alone = stylist_prompts(articles, None, prompts, "facts")
    assert alone[0].startswith("Write a note about the product from these facts:\nproduct: ")
    with pytest.raises(ValueError, match="one draft per article"):
        stylist_prompts(articles, drafts[:1], prompts, "draft")
