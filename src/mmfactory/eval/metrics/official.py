"""How the official evaluation scripts read a reply: POPE's yes/no, the VQAv2 consensus accuracy, MMBench's
option letter. Used to score external benchmark files (:mod:`mmfactory.eval.external`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from mmfactory.eval.metrics.classification import normalize_answer, parse_choice

# MMBench's can_infer_option blanks these before looking for a standalone option letter
_OPTION_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def pope_reading(reply: str) -> Literal["yes", "no"]:
    """A reply to a POPE probe as POPE's ``evaluate.py`` and LLaVA's ``llava/eval/eval_pope.py`` read it.

    Keep the first sentence (up to the first ``.``), drop commas, split on single spaces: ``"no"`` if a word
    is ``No``, ``no`` or ``not``, else ``"yes"``. So a reply with neither word counts as yes, and the match
    is case-sensitive (``"NO"`` reads yes), as in those scripts.
    """
    words = reply.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def vqa_v2_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2's accuracy of one answer (percent): ``min(#humans who gave it / 3, 1)`` averaged over the
    ``n`` subsets of ``n - 1`` human answers (10 choose 9 for VQAv2's ten), after :func:`normalize_answer`.

    Equals the official ``vqaEval.py`` loop (each human answer left out in turn) up to the normalisation:
    ours lacks its contraction table and is applied always (the official one only where the humans disagree).
    """
    if len(human_answers) < 2:
        raise ValueError(f"the consensus accuracy needs at least 2 human answers, got {len(human_answers)}")
    answer = normalize_answer(prediction)
    humans = [normalize_answer(human) for human in human_answers]
    matches = humans.count(answer)
    # leaving out a human who gave the answer leaves matches - 1 among the others, leaving out another matches
    scores = [min((matches - (human == answer)) / 3, 1.0) for human in humans]
    return 100.0 * sum(scores) / len(scores)


def mmbench_choice(reply: str, options: Sequence[str], letters: str = "ABCD") -> str | None:
    """The option letter a reply to a multiple-choice question gives, or None; ``options`` in the order asked.

    Three rules in turn: the reply opens with a letter (:func:`parse_choice`: ``"B"``, ``"(b) red"``); else
    exactly one of the asked letters stands alone in it after blanking ``.()[],:;!*#{}`` (MMBench's
    ``can_infer_option``: ``"The answer is B."``; unlike it, an ``A`` before a lowercase word is the article,
    as in ``"A red circle"``); else exactly one option's text is in it, ignoring case (MMBench's
    ``can_infer_text``). MMBench's last resort, asking ChatGPT, is not taken: None is wrong.
    """
    asked = letters[: len(options)]
    letter = parse_choice(reply, asked)
    if letter is not None:
        return letter
    words = reply.translate(_OPTION_PUNCTUATION).split()
    article = {k for k, word in enumerate(words[:-1]) if word == "A" and words[k + 1].islower()}
    standing = sorted({word for k, word in enumerate(words) if word in asked and k not in article})
    if len(standing) == 1:
        return standing[0]
    named = [c for c, option in zip(asked, options, strict=True) if option.lower() in reply.lower()]
    return named[0] if len(named) == 1 else None
