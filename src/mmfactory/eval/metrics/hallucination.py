"""Hallucination rates of generated text: NoteBench-style claims against source facts, and CHAIR-style
object hallucination of image descriptions (:func:`object_hallucination`).

Each sample has source facts and the facts claimed by the generated text (extracted elsewhere), both
``{attribute: value}``. Keys and values are compared after ``strip().casefold()``. A claim is

* a **factuality** error when the source has the key with a different value (it contradicts it);
* a **faithfulness** error when the source lacks the key (it is unsupported).

Claim-level rates divide by the number of claims in the corpus; sample-level rates divide by the
number of samples and count a sample once if any of its claims is such an error. A sample with no
claims has no errors (and adds nothing to the claim-level denominators), and a rate whose
denominator is zero is 0.0, so generating nothing scores no hallucination: read it together with
``num_claims`` or a coverage metric such as ROUGE-L.
"""

from collections.abc import Mapping, Sequence


def _normalize(text: str) -> str:
    return text.strip().casefold()


def hallucination_rates(
    sources: Sequence[Mapping[str, str]], claims: Sequence[Mapping[str, str]]
) -> dict[str, float | int]:
    """Hallucination rates (percent) over ``N`` samples.

    Args:
        sources: ``N`` dicts of source facts.
        claims: ``N`` dicts of facts claimed by the generated texts.

    Returns:
        ``factuality_rate`` and ``faithfulness_rate`` (share of claims contradicted / unsupported),
        ``sample_factuality_rate``, ``sample_faithfulness_rate`` and ``sample_hallucination_rate``
        (share of samples with at least one contradicted / unsupported / either claim), all in
        percent; ``num_claims`` and ``num_samples``.
    """
    if len(sources) != len(claims):
        raise ValueError(f"{len(sources)} sources but {len(claims)} claim sets")
    num_claims = num_contradicted = num_unsupported = 0
    samples_contradicted = samples_unsupported = samples_any = 0
    for source, claimed in zip(sources, claims, strict=True):
        facts = {_normalize(key): _normalize(value) for key, value in source.items()}
        contradicted = unsupported = 0
        for key, value in claimed.items():
            source_value = facts.get(_normalize(key))
            if source_value is None:
                unsupported += 1
            elif source_value != _normalize(value):
                contradicted += 1
        num_claims += len(claimed)
        num_contradicted += contradicted
        num_unsupported += unsupported
        samples_contradicted += contradicted > 0
        samples_unsupported += unsupported > 0
        samples_any += contradicted + unsupported > 0

    def percent(count: int, total: int) -> float:
        return 100.0 * count / total if total else 0.0

    num_samples = len(sources)
    return {
        "factuality_rate": percent(num_contradicted, num_claims),
        "faithfulness_rate": percent(num_unsupported, num_claims),
        "sample_factuality_rate": percent(samples_contradicted, num_samples),
        "sample_faithfulness_rate": percent(samples_unsupported, num_samples),
        "sample_hallucination_rate": percent(samples_any, num_samples),
        "num_claims": num_claims,
        "num_samples": num_samples,
    }


def object_hallucination(
    mentioned: Sequence[Sequence[str]], present: Sequence[Sequence[str]]
) -> dict[str, float | int]:
    """CHAIR (Rohrbach et al. 2018), the response / mention rates of Object HalBench, over ``N`` responses.

    Args:
        mentioned: per response, the objects it mentions (repeats count as separate mentions).
        present: per response, the objects in its image.

    Returns:
        ``chair_i``: hallucinated mentions / all mentions; ``chair_s``: responses with at least one
        hallucinated mention / all responses; ``object_recall``: present objects mentioned / all present
        objects (so that saying nothing does not look good); all in percent, plus ``num_mentions``.
    """
    if len(mentioned) != len(present):
        raise ValueError(f"{len(mentioned)} mention lists but {len(present)} object lists")
    num_mentions = hallucinated = responses_hallucinating = num_present = recalled = 0
    for said, truth in zip(mentioned, present, strict=True):
        truth_set, said_set = set(truth), set(said)
        wrong = sum(obj not in truth_set for obj in said)
        num_mentions += len(said)
        hallucinated += wrong
        responses_hallucinating += wrong > 0
        num_present += len(truth_set)
        recalled += len(truth_set & said_set)

    def percent(count: int, total: int) -> float:
        return 100.0 * count / total if total else 0.0

    return {
        "chair_i": percent(hallucinated, num_mentions),
        "chair_s": percent(responses_hallucinating, len(mentioned)),
        "object_recall": percent(recalled, num_present),
        "num_mentions": num_mentions,
    }
