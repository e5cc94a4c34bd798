"""Vectorised n-gram counting over a whole corpus, shared by BLEU-4 and CIDEr-D.

Every n-gram gets an integer code, equal codes meaning equal n-grams: a word's code is its
vocabulary index, and a k-gram's code is the rank of the pair (code of its first k-1 words, last
word) among all such pairs in the corpus. Counts are then sparse arrays sorted by (sentence, code),
so matching n-grams between sentences is a ``searchsorted`` rather than a dict lookup per n-gram.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NgramCounts:
    """The distinct n-grams of one order in each sentence, ``E`` entries sorted by ``key``."""

    sentence: np.ndarray  # [E] sentence index
    code: np.ndarray  # [E] n-gram code, in [0, num_codes)
    count: np.ndarray  # [E] occurrences of the n-gram in the sentence
    num_codes: int

    @property
    def key(self) -> np.ndarray:
        """[E] ``sentence * num_codes + code``, strictly increasing."""
        return self.sentence * self.num_codes + self.code


def index_within_group(group_sizes: np.ndarray) -> np.ndarray:
    """``[sum(group_sizes)]`` position of each element inside its group: sizes (2, 3) -> 0 1 0 1 2."""
    return np.arange(group_sizes.sum()) - np.repeat(np.cumsum(group_sizes) - group_sizes, group_sizes)


def lookup_sorted(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each query, ``values[i]`` where it equals ``sorted_keys[i]`` (strictly increasing), else 0."""
    if len(sorted_keys) == 0:
        return np.zeros(len(queries), dtype=values.dtype)
    index = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return np.where(sorted_keys[index] == queries, values[index], 0)


def count_ngrams(token_lists: Sequence[Sequence[str]], max_order: int) -> list[NgramCounts]:
    """Counts of the n-grams of orders ``1..max_order`` (one :class:`NgramCounts` each) of ``S`` sentences."""
    vocabulary: dict[str, int] = {}
    lengths = np.array([len(tokens) for tokens in token_lists], dtype=np.int64)  # [S]
    word_ids = np.fromiter(
        (vocabulary.setdefault(word, len(vocabulary)) for tokens in token_lists for word in tokens),
        dtype=np.int64,
        count=int(lengths.sum()),
    )  # [T] all tokens, sentence after sentence
    sentence_of_token = np.repeat(np.arange(len(lengths)), lengths)  # [T]
    tokens_to_end = np.repeat(lengths, lengths) - index_within_group(lengths)  # [T]

    counts = []
    codes = word_ids  # [T] code of the n-gram starting at each token (meaningless past a sentence end)
    for order in range(1, max_order + 1):
        if order > 1:
            next_word = word_ids[np.minimum(np.arange(len(word_ids)) + order - 1, len(word_ids) - 1)]
            codes = np.unique(codes * len(vocabulary) + next_word, return_inverse=True)[1]
        starts_ngram = tokens_to_end >= order
        num_codes = int(codes.max(initial=0)) + 1
        keys, count = np.unique(
            sentence_of_token[starts_ngram] * num_codes + codes[starts_ngram], return_counts=True
        )
        counts.append(NgramCounts(keys // num_codes, keys % num_codes, count, num_codes))
    return counts
