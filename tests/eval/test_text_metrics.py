"""ROUGE-L, BLEU-4 and CIDEr-D against rouge-score, sacrebleu and pycocoevalcap."""

import itertools
import random
import re
from collections import Counter

import numpy as np
import pytest
import sacrebleu
from nltk.stem import porter
from pycocoevalcap.cider.cider import Cider
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

from mmfactory.eval.metrics import (
    cider_d,
    corpus_bleu,
    lcs_length,
    rouge_l,
    tokenize_13a,
    tokenize_rouge,
    tokenize_zh,
)
from mmfactory.eval.metrics.ngrams import count_ngrams

TOL = 1e-6
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"


def naive_lcs(a: list, b: list) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


class CharTokenizer:
    """rouge-score tokenizer for Chinese: each CJK char a token, rouge-score's own rules elsewhere."""

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for piece in re.sub(f"([{CJK}])", r" \1 ", text.lower()).split():
            is_cjk = len(piece) == 1 and re.fullmatch(f"[{CJK}]", piece)
            tokens += [piece] if is_cjk else rouge_tokenize.tokenize(piece, None)
        return tokens


def streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-prediction reference lists -> sacrebleu's reference streams, padded with None."""
    width = max(map(len, references))
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


# ---------------------------------------------------------------- ROUGE-L


def test_lcs_length_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 90))]
        assert lcs_length(a, b) == naive_lcs(a, b)


def test_rouge_tokenizer_matches_rouge_score(english_pairs):
    for prediction, references in english_pairs:
        for text in [prediction, *references]:
            assert tokenize_rouge(text) == rouge_tokenize.tokenize(text, None)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_rouge_l_matches_rouge_score_per_pair_and_corpus(lang, english_pairs, chinese_pairs):
    pairs = english_pairs if lang == "en" else chinese_pairs
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer() if lang == "zh" else None)
    expected = []
    for prediction, references in pairs:
        score = scorer.score_multi(references, prediction)["rougeL"]
        expected.append((score.precision, score.recall, score.fmeasure))
        ours = rouge_l([prediction], [references], lang=lang)
        assert (ours["precision"], ours["recall"], ours["f"]) == pytest.approx(expected[-1], abs=TOL)
    corpus = rouge_l([p for p, _ in pairs], [r for _, r in pairs], lang=lang)
    mean = np.mean(expected, axis=0)
    assert (corpus["precision"], corpus["recall"], corpus["f"]) == pytest.approx(tuple(mean), abs=TOL)
    assert 0.3 < corpus["f"] < 0.95  # a corpus with real variety, not all zeros or ones


def test_rouge_l_with_porter_stemmer_matches_use_stemmer(english_pairs):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    stem = porter.PorterStemmer().stem
    for prediction, references in english_pairs[:60]:
        expected = scorer.score_multi(references, prediction)["rougeL"].fmeasure
        assert rouge_l([prediction], [references], stemmer=stem)["f"] == pytest.approx(expected, abs=TOL)


def test_rouge_l_edge_cases():
    assert rouge_l(["a cat"], [""]) == {"precision": 0.0, "recall": 0.0, "f": 0.0}
    assert rouge_l([""], ["a cat"]) == {"precision": 0.0, "recall": 0.0, "f": 0.0}
    assert rouge_l(["A cat, sat!"], ["a cat sat"]) == {"precision": 1.0, "recall": 1.0, "f": 1.0}
    assert rouge_l(["dog runs"], ["a cat sat"])["f"] == 0.0
    # LCS "a b" of 3 prediction / 4 reference tokens: P 2/3, R 1/2, F 4/7
    assert rouge_l(["a x b"], ["a b y z"]) == pytest.approx({"precision": 2 / 3, "recall": 0.5, "f": 4 / 7})
    assert rouge_l(["红色的猫"], ["一只红色猫"], lang="zh")["f"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert rouge_l([], []) == {"precision": 0.0, "recall": 0.0, "f": 0.0}
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l(["a"], [[]])


# ---------------------------------------------------------------- n-grams, BLEU-4


def test_count_ngrams_matches_counters():
    """Per sentence the n-gram counts agree, and equal codes mean equal n-grams across sentences."""
    rng = random.Random(0)
    token_lists = [rng.choices("abcd", k=rng.randint(0, 9)) for _ in range(30)]
    for order, ngrams in enumerate(count_ngrams(token_lists, 4), start=1):
        expected = [
            Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))
            for tokens in token_lists
        ]
        ours = [{} for _ in token_lists]
        for sentence, code, count in zip(ngrams.sentence, ngrams.code, ngrams.count, strict=True):
            ours[sentence][int(code)] = int(count)
        assert np.all(np.diff(ngrams.key) > 0)
        for a, b in itertools.combinations_with_replacement(range(len(token_lists)), 2):
            assert sorted(ours[a].values()) == sorted(expected[a].values())
            shared = sum(min(count, ours[b][code]) for code, count in ours[a].items() if code in ours[b])
            assert shared == sum((expected[a] & expected[b]).values())


SPECIAL_LINES = [
    "a &amp; b &quot;c&quot; &lt;d&gt; <skipped> e",
    "line one-\ncontinued\nnext line",
    "1,000.50 -3 x-ray 3-4 a.b,c 1.a a.1 ... ,,",
    "  leading and trailing spaces  ",
    "tabs\tand\u00a0nbsp",
    "{braces} [brackets] ^caret_ `tick` ~tilde| @at #hash",
]


def test_tokenize_13a_matches_sacrebleu(english_pairs):
    reference = Tokenizer13a()
    for text in SPECIAL_LINES + [text for p, refs in english_pairs for text in [p, *refs]]:
        assert tokenize_13a(text) == reference(text)


def test_tokenize_zh_matches_sacrebleu_on_every_code_point(chinese_pairs):
    reference = TokenizerZh()
    for text in SPECIAL_LINES + [text for p, refs in chinese_pairs for text in [p, *refs]]:
        assert tokenize_zh(text) == reference(text)
    # every BMP code point and a sample of the supplementary planes, between two letters
    code_points = [c for c in range(0x20, 0x10000) if not 0xD800 <= c < 0xE000]
    code_points += list(range(0x1F000, 0x32000, 97))
    for start in range(0, len(code_points), 1000):
        line = " ".join(f"a{chr(c)}b" for c in code_points[start : start + 1000])
        assert tokenize_zh(line) == reference(line), f"code points from {hex(code_points[start])}"


@pytest.mark.parametrize("tokenize", ["13a", "zh"])
def test_corpus_bleu_matches_sacrebleu(tokenize, english_pairs, chinese_pairs):
    pairs = english_pairs + chinese_pairs if tokenize == "zh" else english_pairs
    predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
    for lowercase in (False, True):
        ours = corpus_bleu(predictions, references, tokenize=tokenize, lowercase=lowercase)
        expected = sacrebleu.corpus_bleu(
            predictions, streams(references), tokenize=tokenize, lowercase=lowercase
        )
        assert ours["bleu"] == pytest.approx(expected.score, abs=TOL)
        assert ours["precisions"] == pytest.approx(expected.precisions, abs=TOL)
        assert ours["brevity_penalty"] == pytest.approx(expected.bp, abs=TOL)
        assert (ours["hyp_len"], ours["ref_len"]) == (expected.sys_len, expected.ref_len)
    assert 20 < ours["bleu"] < 90


@pytest.mark.parametrize("tokenize", ["13a", "zh"])
def test_single_segment_bleu_matches_sacrebleu(tokenize, english_pairs, chinese_pairs):
    """One-segment corpora exercise smoothing, zero matches and the brevity penalty per pair."""
    for prediction, references in english_pairs if tokenize == "13a" else chinese_pairs:
        expected = sacrebleu.corpus_bleu([prediction], [[r] for r in references], tokenize=tokenize)
        assert corpus_bleu([prediction], [references], tokenize=tokenize)["bleu"] == pytest.approx(
            expected.score, abs=TOL
        )


def test_bleu_edge_cases():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100.0)
    assert corpus_bleu([""], ["the cat sat on the mat"])["bleu"] == 0.0
    assert corpus_bleu(["the cat sat on the mat"], [""])["bleu"] == 0.0
    assert corpus_bleu(["dogs run fast today"], ["the cat sat on the mat"])["bleu"] == 0.0
    # shorter than 4 tokens: no 4-grams at all gives 0, as in sacrebleu
    assert corpus_bleu(["the cat sat"], ["the cat sat"])["bleu"] == 0.0
    # hand-computed: 4 unigrams all match, 3/3 bigrams, 2/2 trigrams, 1/1 4-gram, BP exp(1 - 6/4)
    short = corpus_bleu(["the cat sat on"], ["the cat sat on the mat"])
    assert short["brevity_penalty"] == pytest.approx(np.exp(-0.5))
    assert short["bleu"] == pytest.approx(100 * np.exp(-0.5))
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu(["a"], [[]])


# ---------------------------------------------------------------- CIDEr-D


def tokenized(text: str) -> str:
    return tokenize_13a(text.lower())


def test_cider_d_matches_pycocoevalcap(english_pairs):
    predictions = [tokenized(p) for p, _ in english_pairs]
    references = [[tokenized(r) for r in refs] for _, refs in english_pairs]
    expected_mean, expected = Cider().compute_score(
        {i: refs for i, refs in enumerate(references)}, {i: [p] for i, p in enumerate(predictions)}
    )
    ours = cider_d(predictions, references)
    np.testing.assert_allclose(ours["per_sample"], expected, rtol=0, atol=TOL)
    assert ours["cider_d"] == pytest.approx(expected_mean, abs=TOL)
    assert 1.0 < ours["cider_d"] < 10.0


def test_cider_d_matches_pycocoevalcap_on_repetitive_random_captions():
    """A 6-word vocabulary gives repeated n-grams (clipping), shared n-grams (idf) and 0-5 word captions."""
    rng = random.Random(0)

    def caption() -> str:
        return " ".join(rng.choices("abcdef", k=rng.randint(0, 12)))

    predictions = [caption() for _ in range(200)]
    references = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(200)]
    _, expected = Cider().compute_score(
        dict(enumerate(references)), {i: [p] for i, p in enumerate(predictions)}
    )
    np.testing.assert_allclose(cider_d(predictions, references)["per_sample"], expected, rtol=0, atol=TOL)


def test_cider_d_sigma_matches_pycocoevalcap(english_pairs):
    pairs = english_pairs[:80]
    predictions = [tokenized(p) for p, _ in pairs]
    references = [[tokenized(r) for r in refs] for _, refs in pairs]
    _, expected = Cider(sigma=3.0).compute_score(
        {i: refs for i, refs in enumerate(references)}, {i: [p] for i, p in enumerate(predictions)}
    )
    ours = cider_d(predictions, references, sigma=3.0)
    np.testing.assert_allclose(ours["per_sample"], expected, rtol=0, atol=TOL)


def test_cider_d_edge_cases():
    references = [["a cat sits on a mat"], ["two dogs play in the park"], ["a red car"]]
    scores = cider_d(["", "two dogs play in the park", "blue sky today"], references)["per_sample"]
    assert scores[0] == 0.0 and scores[2] == 0.0  # empty prediction, no overlap
    # identical caption: cosine 1 for every order, no length penalty -> exactly 10
    assert scores[1] == pytest.approx(10.0)
    assert cider_d(["a cat"], [["a cat"]])["cider_d"] == 0.0  # one sample: every idf is log(1) - log(1)
    assert cider_d(["a cat", "a dog"], [[""], ["a dog"]])["per_sample"][0] == 0.0  # empty reference
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d(["a"], ["a"])
