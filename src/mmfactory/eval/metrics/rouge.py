"""ROUGE-L (sentence-level LCS F-measure), equal to ``rouge-score``'s ``rougeL``.

English (``lang="en"``) uses rouge-score's default tokenizer: lowercase, every run of characters
outside ``[a-z0-9]`` is a separator (so accented letters and CJK are dropped, as in rouge-score),
no stemming unless a ``stemmer`` is given (rouge-score stems only tokens longer than 3 characters;
pass ``nltk.stem.PorterStemmer().stem`` to reproduce ``use_stemmer=True``).

Chinese (``lang="zh"``) is character-level: lowercase, every CJK character (Han ideographs, kana,
hangul) is one token, runs of ``[a-z0-9]`` are tokens as in English, everything else (whitespace,
punctuation, full-width forms) separates. This equals rouge-score's ``RougeScorer(["rougeL"],
tokenizer=...)`` with a tokenizer doing the same.

The LCS length is computed with the bit-parallel algorithm of Crochemore et al. (2001), which gives
exactly the DP table's last cell in O(n * ceil(m / word)) big-integer operations.
"""

import re
from collections.abc import Callable, Sequence
from typing import Literal

_EN_TOKEN = re.compile(r"[a-z0-9]+")
_CJK_CHARS = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # CJK unified ideographs extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-G and compatibility supplement
)
_ZH_TOKEN = re.compile(f"[{_CJK_CHARS}]|[a-z0-9]+")


def tokenize_rouge(
    text: str, lang: Literal["en", "zh"] = "en", stemmer: Callable[[str], str] | None = None
) -> list[str]:
    """Tokens of ``text`` as ROUGE-L sees them (see the module docstring)."""
    if lang == "en":
        tokens = _EN_TOKEN.findall(text.lower())
    elif lang == "zh":
        tokens = _ZH_TOKEN.findall(text.lower())
    else:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    if stemmer is not None:
        tokens = [stemmer(token) if len(token) > 3 else token for token in tokens]
    return tokens


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a
    match_bits: dict[str, int] = {}
    for position, token in enumerate(a):
        match_bits[token] = match_bits.get(token, 0) | (1 << position)
    all_ones = (1 << len(a)) - 1
    # After each token of b, the 0 bits of `v` mark the rows where the DP column of that prefix of b
    # grows by one (L[i + 1][j] = L[i][j] + 1), so their count is the LCS of a and that prefix.
    v = all_ones
    for token in b:
        u = v & match_bits.get(token, 0)
        v = ((v + u) | (v - u)) & all_ones
    return len(a) - v.bit_count()


def _lcs_scores(target: list[str], prediction: list[str]) -> tuple[float, float, float]:
    """(precision, recall, F1) of one pair; all 0 when either side has no tokens (as rouge-score)."""
    if not target or not prediction:
        return 0.0, 0.0, 0.0
    lcs = lcs_length(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    f = 2 * precision * recall / (precision + recall) if lcs else 0.0
    return precision, recall, f


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    lang: Literal["en", "zh"] = "en",
    stemmer: Callable[[str], str] | None = None,
) -> dict[str, float]:
    """Corpus ROUGE-L: the mean over pairs of sentence-level LCS precision, recall and F1, in [0, 1].

    Args:
        predictions: ``N`` generated texts.
        references: ``N`` references, each a string or a non-empty list of strings; with several, the
            reference with the highest F1 is used (the first on ties), like ``RougeScorer.score_multi``.
        lang: ``"en"`` (word-level) or ``"zh"`` (character-level), see the module docstring.
        stemmer: optional word stemmer applied to tokens longer than 3 characters.

    Returns:
        ``{"precision", "recall", "f"}``; all 0.0 for an empty corpus.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    totals = [0.0, 0.0, 0.0]
    for prediction, refs in zip(predictions, references, strict=True):
        if isinstance(refs, str):
            refs = [refs]
        if not refs:
            raise ValueError("every prediction needs at least one reference")
        prediction_tokens = tokenize_rouge(prediction, lang, stemmer)
        best = max(
            (_lcs_scores(tokenize_rouge(ref, lang, stemmer), prediction_tokens) for ref in refs),
            key=lambda scores: scores[2],
        )
        for i in range(3):
            totals[i] += best[i]
    count = max(len(predictions), 1)
    return {"precision": totals[0] / count, "recall": totals[1] / count, "f": totals[2] / count}
