"""CIDEr-D, equal to ``pycocoevalcap.cider.Cider`` on already tokenized text.

pycocoevalcap runs its Java PTB tokenizer first; here inputs are whitespace-split as given, so pass
lowercased, tokenized strings (as the PTB tokenizer would output) to compare with published numbers.

For each sample, hypothesis and references become tf-idf vectors of n-grams, n = 1..4, with
``idf(g) = log(num_samples) - log(max(1, df(g)))`` and ``df(g)`` the number of samples whose
references contain ``g`` (the evaluated corpus is the document collection). Per order n and
reference r: ``sum_g min(h_g, r_g) * r_g / (|h| |r|)`` (clipped cosine), times the Gaussian length
penalty ``exp(-(l_h - l_r)^2 / (2 sigma^2))``; the sample score is the mean over orders, averaged
over references, times 10. As in pycocoevalcap, the "length" in the penalty is the number of
bigrams (``max(num_words - 1, 0)``), and a corpus of one sample scores 0 (every idf is 0).
"""

import math
from collections import Counter
from collections.abc import Sequence

MAX_ORDER = 4


def _ngram_counts(tokens: list[str]) -> Counter:
    """Counts of all n-grams (tuples) of orders 1..MAX_ORDER."""
    counts = Counter(zip(tokens))
    for order in range(2, MAX_ORDER + 1):
        counts.update(zip(*(tokens[i:] for i in range(order))))
    return counts


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    sigma: float = 6.0,
) -> dict[str, float | list[float]]:
    """Corpus CIDEr-D (pycocoevalcap's scale: identical captions in a diverse corpus score ~10).

    Args:
        predictions: ``N`` tokenized hypotheses (tokens separated by whitespace).
        references: ``N`` non-empty lists of tokenized references.
        sigma: standard deviation of the Gaussian length penalty.

    Returns:
        ``{"cider_d": mean over samples, "per_sample": N scores}``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if any(isinstance(refs, str) or not refs for refs in references):
        raise ValueError("every prediction needs a non-empty list of references")
    ref_counts = [[_ngram_counts(ref.split()) for ref in refs] for refs in references]
    doc_freq: Counter = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_num_samples = math.log(len(references)) if references else 0.0
    idf = {ngram: log_num_samples - math.log(df) for ngram, df in doc_freq.items()}

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        """Per-order weight dicts, their L2 norms, and the bigram count used as length."""
        vectors: list[dict] = [{} for _ in range(MAX_ORDER)]
        for ngram, count in counts.items():
            vectors[len(ngram) - 1][ngram] = count * idf.get(ngram, log_num_samples)
        norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
        return vectors, norms, sum(counts[g] for g in vectors[1])

    scores = []
    for prediction, refs in zip(predictions, ref_counts, strict=True):
        hyp, hyp_norms, hyp_len = tfidf(_ngram_counts(prediction.split()))
        total = 0.0
        for ref_ngrams in refs:
            ref, ref_norms, ref_len = tfidf(ref_ngrams)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for h, r, h_norm, r_norm in zip(hyp, ref, hyp_norms, ref_norms, strict=True):
                if h_norm and r_norm:
                    overlap = sum(min(w, r[g]) * r[g] for g, w in h.items() if g in r)
                    total += overlap / (h_norm * r_norm) * penalty
        scores.append(10.0 * total / (MAX_ORDER * len(refs)))
    return {"cider_d": sum(scores) / len(scores) if scores else 0.0, "per_sample": scores}
