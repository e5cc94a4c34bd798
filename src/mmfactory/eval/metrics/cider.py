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

The computation is vectorised over the corpus (see :mod:`mmfactory.eval.metrics.ngrams`).
"""

from collections.abc import Sequence

import numpy as np

from mmfactory.eval.metrics.ngrams import count_ngrams, index_within_group, lookup_sorted

MAX_ORDER = 4


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
    num_samples = len(predictions)
    if num_samples == 0:
        return {"cider_d": 0.0, "per_sample": []}

    # Sentences 0..N-1 are the hypotheses, N..N+R-1 the references, sample by sample.
    token_lists = [text.split() for text in predictions] + [
        ref.split() for refs in references for ref in refs
    ]
    num_refs = np.array([len(refs) for refs in references])  # [N]
    sample_of_ref = np.repeat(np.arange(num_samples), num_refs)  # [R]
    first_ref = np.cumsum(num_refs) - num_refs  # [N] index of each sample's first reference

    log_num_samples = np.log(float(num_samples))
    similarity = np.zeros(len(sample_of_ref))  # [R] sum over orders of the clipped cosine
    for ngrams in count_ngrams(token_lists, MAX_ORDER):
        is_ref = ngrams.sentence >= num_samples
        ref_sample = sample_of_ref[ngrams.sentence[is_ref] - num_samples]
        sample_codes = np.unique(ref_sample * ngrams.num_codes + ngrams.code[is_ref]) % ngrams.num_codes
        doc_freq = np.bincount(sample_codes, minlength=ngrams.num_codes)
        weight = ngrams.count * (log_num_samples - np.log(np.maximum(doc_freq[ngrams.code], 1)))
        norm = np.sqrt(np.bincount(ngrams.sentence, weight**2, minlength=len(token_lists)))  # [S]

        # pair every hypothesis entry with each reference of its sample and look the n-gram up there
        hyp_entries = np.flatnonzero(~is_ref)
        copies = num_refs[ngrams.sentence[hyp_entries]]
        hyp_entries = np.repeat(hyp_entries, copies)
        ref_index = first_ref[ngrams.sentence[hyp_entries]] + index_within_group(copies)
        ref_keys = (num_samples + ref_index) * ngrams.num_codes + ngrams.code[hyp_entries]
        ref_weight = lookup_sorted(ngrams.key, weight, ref_keys)
        clipped = np.minimum(weight[hyp_entries], ref_weight) * ref_weight
        clipped_dot = np.bincount(ref_index, clipped, minlength=len(sample_of_ref))  # [R]
        norms = norm[sample_of_ref] * norm[num_samples:]  # [R]
        similarity += np.divide(clipped_dot, norms, out=np.zeros(len(norms)), where=norms > 0)

    lengths = np.array([len(tokens) for tokens in token_lists])
    num_bigrams = np.maximum(lengths - 1, 0)
    length_gap = num_bigrams[sample_of_ref] - num_bigrams[num_samples:]  # [R]
    penalized = similarity * np.exp(-(length_gap**2) / (2 * sigma**2))
    scores = 10.0 * np.bincount(sample_of_ref, penalized, minlength=num_samples) / (MAX_ORDER * num_refs)
    return {"cider_d": float(scores.mean()), "per_sample": scores.tolist()}
