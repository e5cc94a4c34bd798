"""Corpus BLEU-4, equal to ``sacrebleu.corpus_bleu`` (default ``smooth_method="exp"``).

Tokenizers reproduce sacrebleu's ``13a`` (mteval-v13a, the WMT default) and ``zh`` rules:

* shared post-tokenizer: space out the symbols ``{|}~ [\\]^_` !"#$%& ()*+ :;<=>?@ /``; space out
  ``.`` and ``,`` unless both neighbours are digits (``3.5`` and ``1,000`` stay whole); space out
  ``-`` after a digit; collapse whitespace.
* ``13a`` first removes ``<skipped>`` and ``-\\n``, turns newlines into spaces and unescapes
  ``&quot; &amp; &lt; &gt;``.
* ``zh`` first strips the line and puts spaces around every character in sacrebleu's "Chinese"
  ranges (ideographs, CJK punctuation, full-width forms, and more, see ``_ZH_RANGES``).

Score: ``BP * exp(mean_n log p_n)`` over n = 1..4, in [0, 100]; ``p_n`` is the clipped n-gram
precision summed over the corpus, the clip count per n-gram being its maximum count in any
reference of the segment; the brevity penalty uses, per segment, the reference length closest to
the hypothesis length (the shorter one on ties). "exp" smoothing: the k-th order with no match
gets precision ``100 / (2^k * total_n)``; an order with no hypothesis n-gram at all gives BLEU 0.
"""

import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from mmfactory.eval.metrics.ngrams import count_ngrams, lookup_sorted

MAX_ORDER = 4


def _spacing_table(ranges: tuple[tuple[int, int], ...]) -> dict[int, str]:
    """``str.translate`` table that puts a space on both sides of every code point in ``ranges``."""
    return {code: f" {chr(code)} " for low, high in ranges for code in range(low, high + 1)}


# sacrebleu's regex class [{-~[-` -&(-+:-@/], applied with str.translate (same result, faster)
_SYMBOL_SPACING = _spacing_table(
    ((0x7B, 0x7E), (0x5B, 0x60), (0x20, 0x26), (0x28, 0x2B), (0x3A, 0x40), (0x2F, 0x2F))
)
_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([\.,])")
_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([\.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")

# Code points that sacrebleu's `zh` tokenizer treats as Chinese. sacrebleu writes the two
# supplementary-plane ranges as "\u20000"-"\u2a6d6" and "\u2f800"-"\u2fa1d", which Python reads as
# two-character strings; compared with one character they select U+2001-U+2A6D and U+2F81-U+2FA1
# (general punctuation, arrows, math symbols, ...), not the ideograph extensions. We keep that
# behaviour so that scores equal sacrebleu's.
_ZH_RANGES = (
    (0x3400, 0x4DB5),
    (0x4E00, 0x9FA5),
    (0x9FA6, 0x9FBB),
    (0xF900, 0xFA2D),
    (0xFA30, 0xFA6A),
    (0xFA70, 0xFAD9),
    (0x2001, 0x2A6D),
    (0x2F81, 0x2FA1),
    (0xFF00, 0xFFEF),
    (0x2E80, 0x2EFF),
    (0x3000, 0x303F),
    (0x31C0, 0x31EF),
    (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF),
    (0x3100, 0x312F),
    (0x31A0, 0x31BF),
    (0xFE10, 0xFE1F),
    (0xFE30, 0xFE4F),
    (0x2600, 0x26FF),
    (0x2700, 0x27BF),
    (0x3200, 0x32FF),
    (0x3300, 0x33FF),
)
_ZH_SPACING = _spacing_table(_ZH_RANGES)


def _post_tokenize(line: str) -> str:
    line = line.translate(_SYMBOL_SPACING)
    if "." in line or "," in line:
        line = _PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", line)
        line = _PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", line)
    if "-" in line:
        line = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", line)
    return " ".join(line.split())


def tokenize_13a(line: str) -> str:
    """sacrebleu's ``13a`` tokenization of one line (tokens joined by single spaces)."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return _post_tokenize(f" {line} ")


def tokenize_zh(line: str) -> str:
    """sacrebleu's ``zh`` tokenization of one line (tokens joined by single spaces)."""
    return _post_tokenize(line.strip().translate(_ZH_SPACING))


_TOKENIZERS = {"13a": tokenize_13a, "zh": tokenize_zh}


def corpus_bleu(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    tokenize: Literal["13a", "zh"] = "13a",
    lowercase: bool = False,
) -> dict[str, float | list[float]]:
    """Corpus BLEU-4 as ``sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize)``.

    Args:
        predictions: ``N`` hypotheses.
        references: ``N`` entries, each a reference string or a list of them (any number per
            prediction; sacrebleu's stream layout with ``None`` padding is the transpose of this).
        tokenize: ``"13a"`` or ``"zh"``.
        lowercase: lowercase hypotheses and references first (sacrebleu's ``lowercase``).

    Returns:
        ``{"bleu", "precisions" (4 floats), "brevity_penalty", "hyp_len", "ref_len"}``, BLEU and
        precisions in [0, 100].
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if tokenize not in _TOKENIZERS:
        raise ValueError(f"tokenize must be one of {sorted(_TOKENIZERS)}, got {tokenize!r}")
    tokenizer = _TOKENIZERS[tokenize]

    def tokens(text: str) -> list[str]:
        return tokenizer((text.lower() if lowercase else text).rstrip()).split()

    if not predictions:
        return _bleu_from_stats([0] * MAX_ORDER, [0] * MAX_ORDER, 0, 0)
    # Sentences 0..N-1 are the hypotheses, N..N+R-1 the references, segment by segment.
    ref_lists = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    if not all(ref_lists):
        raise ValueError("every prediction needs at least one reference")
    num_segments = len(predictions)
    token_lists = [tokens(text) for text in predictions] + [tokens(ref) for refs in ref_lists for ref in refs]
    num_refs = np.array([len(refs) for refs in ref_lists], dtype=np.int64)  # [N]
    segment_of_ref = np.repeat(np.arange(num_segments), num_refs)  # [R]
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)  # [S]
    hyp_lengths, ref_lengths = lengths[:num_segments], lengths[num_segments:]

    # per segment, the reference length closest to the hypothesis length, the shorter on ties
    scale = int(ref_lengths.max()) + 1
    cost = np.abs(ref_lengths - hyp_lengths[segment_of_ref]) * scale + ref_lengths  # [R]
    closest_ref_len = int((np.minimum.reduceat(cost, np.cumsum(num_refs) - num_refs) % scale).sum())
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    for n, ngrams in enumerate(count_ngrams(token_lists, MAX_ORDER)):
        # clip count of an n-gram in a segment: its largest count in any of the segment's references
        is_ref = ngrams.sentence >= num_segments
        ref_keys = (
            segment_of_ref[ngrams.sentence[is_ref] - num_segments] * ngrams.num_codes + ngrams.code[is_ref]
        )
        clip_keys, entry_to_clip = np.unique(ref_keys, return_inverse=True)
        clip = np.zeros(len(clip_keys), dtype=np.int64)
        np.maximum.at(clip, entry_to_clip, ngrams.count[is_ref])
        # a hypothesis' key is (segment, code) too, since its sentence index is its segment index
        hyp_count = ngrams.count[~is_ref]
        correct[n] = int(np.minimum(hyp_count, lookup_sorted(clip_keys, clip, ngrams.key[~is_ref])).sum())
        total[n] = int(hyp_count.sum())

    return _bleu_from_stats(correct, total, int(hyp_lengths.sum()), closest_ref_len)


def _bleu_from_stats(
    correct: list[int], total: list[int], hyp_len: int, ref_len: int
) -> dict[str, float | list[float]]:
    """BLEU from corpus sufficient statistics: matched and total n-grams per order, lengths."""
    if hyp_len >= ref_len:
        brevity_penalty = 1.0
    elif hyp_len == 0:
        brevity_penalty = 0.0
    else:
        brevity_penalty = math.exp(1 - ref_len / hyp_len)
    precisions = [0.0] * MAX_ORDER
    score = 0.0
    if any(correct):
        unmatched_orders = 0
        for n in range(MAX_ORDER):
            if total[n] == 0:
                break
            if correct[n] == 0:
                unmatched_orders += 1
                precisions[n] = 100.0 / (2**unmatched_orders * total[n])
            else:
                precisions[n] = 100.0 * correct[n] / total[n]
        if all(precisions):
            score = brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / MAX_ORDER)
    return {
        "bleu": score,
        "precisions": precisions,
        "brevity_penalty": brevity_penalty,
        "hyp_len": hyp_len,
        "ref_len": ref_len,
    }
