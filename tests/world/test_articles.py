import itertools

import pytest

from mmfactory.world import World, extract_claims
from mmfactory.world.articles import PRODUCTS, VOCAB


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_vocabulary_values_never_contain_each_other(lang):
    values = [v if lang == "en" else zh for table in VOCAB.values() for v, zh in table.items()] + list(
        PRODUCTS
    )
    for a, b in itertools.permutations(values, 2):
        assert a.lower() not in b.lower(), (a, b)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_extract_claims_recovers_the_facts(lang):
    for a in World().articles("train", 30, lang):
        assert extract_claims(a["draft"], lang) == a["facts"]
        assert extract_claims(a["reference"], lang) == a["facts"]
        assert extract_claims(a["variants"]["off_style"], lang) == a["facts"]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_extract_claims_detects_contradicted_and_unsupported_facts(lang):
    for a in World().articles("val", 30, lang):
        facts = a["facts"]
        changed = a["variant_attributes"]["contradicted"]
        claims = extract_claims(a["variants"]["contradicted"], lang)
        assert [k for k in facts if claims.get(k) != facts[k]] == [changed]
        added = a["variant_attributes"]["unsupported"]
        claims = extract_claims(a["variants"]["unsupported"], lang)
        assert added not in facts and set(claims) - set(facts) == {added}
        assert {k: claims[k] for k in facts} == facts


def test_styled_note_has_the_style_and_the_draft_does_not():
    for a in World().articles("test", 10, "en"):
        note, draft = a["reference"], a["draft"]
        assert note.startswith("✨") and "#GoodFinds" in note and "\n" in note
        assert "✨" not in draft and "#" not in draft
        assert "✨" not in a["variants"]["off_style"] and "#" not in a["variants"]["off_style"]


def test_same_index_has_the_same_facts_in_both_languages():
    en, zh = World().articles("train", 5, "en"), World().articles("train", 5, "zh")
    for a, b in zip(en, zh, strict=True):
        assert a["facts"].keys() == b["facts"].keys()
        assert (a["facts"]["product"], a["facts"].get("price")) == (
            b["facts"]["product"],
            b["facts"].get("price"),
        )
        assert VOCAB["category"][a["facts"]["category"]] == b["facts"]["category"]
