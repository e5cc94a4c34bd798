"""``article`` samples as a source (``format: articles``, :mod:`mmfactory.data.sources`): SAG's fact sets
with their styled reference articles, ``{"id", "lang", "facts", "draft", "reference"}``; ``languages``
keeps only the articles in those languages (the others are counted as ``{split}/other_language``)."""

from __future__ import annotations

from collections import Counter

from mmfactory.data.policy import BadSampleCounter
from mmfactory.data.samples import Samples


def read_articles_source(source, kind, bad: BadSampleCounter, counts: Counter) -> Samples:
    from mmfactory.data.readers import read_articles

    records = read_articles(source.path, on_bad_sample=source.on_bad_sample, counter=bad)
    articles = [records[i] for i in range(len(records))]
    if source.languages is not None:
        kept = [a for a in articles if a["lang"] in source.languages]
        counts["other_language"] += len(articles) - len(kept)
        articles = kept
    return Samples(articles)
