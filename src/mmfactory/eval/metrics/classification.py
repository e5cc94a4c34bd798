"""Answer accuracy for VQA (exact match after light normalisation) and POPE-style yes/no probes."""

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_APOSTROPHE = re.compile(r"['\u2018\u2019]")
# any non-word character except whitespace, underscore, and a period that is not a decimal point
_PUNCTUATION = re.compile(r"[^\w\s.]|_|(?<!\d)\.|\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_LEADING_YES_NO = re.compile(r"[\W_]*(yes|no)\b")


def normalize_answer(answer: str) -> str:
    """VQA-style light normalisation, a simplified form of the official VQA evaluation's.

    Lowercase; drop thousands separators (``1,000`` -> ``1000``) and apostrophes (``don't`` ->
    ``dont``); every other punctuation character becomes a space, except a period between digits
    (``3.5``); number words ``none, zero..ten`` become digits; the articles ``a, an, the`` are
    dropped; whitespace is collapsed. Unlike the official script there is no contraction table.
    """
    text = _THOUSANDS_COMMA.sub("", answer.lower())
    text = _PUNCTUATION.sub(" ", _APOSTROPHE.sub("", text))
    words = (_NUMBER_WORDS.get(word, word) for word in text.split())
    return " ".join(word for word in words if word not in _ARTICLES)


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    question_types: Sequence[str] | None = None,
) -> dict:
    """Exact-match accuracy (percent) after :func:`normalize_answer`.

    Args:
        predictions: ``N`` predicted answers.
        answers: ``N`` ground truths, each one answer or a list of acceptable answers (any matches).
        question_types: optional ``N`` question types for a per-type breakdown.

    Returns:
        ``{"accuracy", "num", "per_type": {type: {"accuracy", "num"}}}`` (``per_type`` empty without
        types); accuracy 0.0 for an empty set.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if question_types is not None and len(question_types) != len(predictions):
        raise ValueError(f"{len(question_types)} question types for {len(predictions)} predictions")
    correct = []
    for prediction, truth in zip(predictions, answers, strict=True):
        accepted = {normalize_answer(truth)} if isinstance(truth, str) else set(map(normalize_answer, truth))
        correct.append(normalize_answer(prediction) in accepted)
    by_type: dict[str, list[bool]] = defaultdict(list)
    if question_types is not None:
        for question_type, is_correct in zip(question_types, correct, strict=True):
            by_type[question_type].append(is_correct)
    return {
        **_accuracy(correct),
        "per_type": {question_type: _accuracy(flags) for question_type, flags in sorted(by_type.items())},
    }


def _accuracy(correct: list[bool]) -> dict:
    return {"accuracy": 100.0 * sum(correct) / len(correct) if correct else 0.0, "num": len(correct)}


def parse_yes_no(text: str) -> Literal["yes", "no"] | None:
    """``"yes"``/``"no"`` if the text starts with that word (after punctuation/whitespace), else None.

    ``"Yes, there is."`` -> yes; ``"**No**"`` -> no; ``"There is no dog"`` and ``"Nope"`` -> None.
    """
    match = _LEADING_YES_NO.match(text.lower())
    return match.group(1) if match else None


def yes_no_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """POPE metrics for free-text answers to yes/no questions; "yes" is the positive class.

    Each prediction is parsed with :func:`parse_yes_no`. A non-answer is wrong: on a "yes" question
    it is a false negative, on a "no" question it is neither a positive nor a true negative.

    Args:
        predictions: ``N`` generated answers.
        labels: ``N`` ground truths, ``"yes"`` or ``"no"`` (case-insensitive).

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1`` and ``yes_ratio`` (share of predictions parsed
        as yes) in percent, ``num`` and ``num_non_answers``. A ratio with a zero denominator is 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    truths = [label.strip().lower() for label in labels]
    if bad := sorted({label for label in truths if label not in ("yes", "no")}):
        raise ValueError(f"labels must be 'yes' or 'no', got {bad[:5]}")
    parsed = [parse_yes_no(prediction) for prediction in predictions]
    pairs = list(zip(parsed, truths, strict=True))
    true_pos = sum(p == t == "yes" for p, t in pairs)
    true_neg = sum(p == t == "no" for p, t in pairs)
    predicted_yes = parsed.count("yes")
    actual_yes = truths.count("yes")
    precision = true_pos / predicted_yes if predicted_yes else 0.0
    recall = true_pos / actual_yes if actual_yes else 0.0
    f1 = 2 * precision * recall / (precision + recall) if true_pos else 0.0
    num = len(pairs)
    return {
        "accuracy": 100.0 * (true_pos + true_neg) / num if num else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * predicted_yes / num if num else 0.0,
        "num": num,
        "num_non_answers": parsed.count(None),
    }


def mme_scores(correct: Sequence[bool], pairs: Sequence[int], categories: Sequence[str]) -> dict[str, float]:
    """MME's two scores (percent): ``acc`` over questions and ``acc_plus`` over images (both questions of
    an image right), overall and per category (``<category>_acc``, ``<category>_acc_plus``).

    Args:
        correct: ``N`` per-question outcomes.
        pairs: ``N`` image ids (the questions of one image share one; MME asks two per image).
        categories: ``N`` categories (one per image).
    """
    if not len(correct) == len(pairs) == len(categories):
        raise ValueError(f"{len(correct)} outcomes, {len(pairs)} image ids, {len(categories)} categories")
    if not correct:
        raise ValueError("no questions to score")
    by_image: dict[int, list[bool]] = defaultdict(list)
    category_of: dict[int, str] = {}
    for right, pair, category in zip(correct, pairs, categories, strict=True):
        by_image[pair].append(bool(right))
        if category_of.setdefault(pair, category) != category:
            raise ValueError(f"image {pair} has questions of two categories")
    scores: dict[str, float] = {}
    for name in [None, *sorted(set(categories))]:
        images = [p for p in by_image if name is None or category_of[p] == name]
        answers = [r for p in images for r in by_image[p]]
        prefix = "" if name is None else f"{name}_"
        scores[f"{prefix}acc"] = 100.0 * sum(answers) / len(answers)
        scores[f"{prefix}acc_plus"] = 100.0 * sum(all(by_image[p]) for p in images) / len(images)
    return scores


def parse_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a reply gives ("B", "B.", "(B) circle", "b", "D: red"), or None. A letter followed
    by a space and more words is not one: "A red circle" begins with an article."""
    match = re.match(r"\s*\(?([A-Za-z])(?:[).:]|\s*$)", text)
    letter = match.group(1).upper() if match else None
    return letter if letter is not None and letter in letters else None


def circular_accuracy(correct: Sequence[bool], questions: Sequence[int]) -> dict[str, float]:
    """MMBench's CircularEval (percent): a question counts only if every rotation of its options was
    answered right (``circular``); ``vanilla`` scores each question's first rotation alone.

    Args:
        correct: ``N`` outcomes, one per (question, rotation), each question's rotations in order.
        questions: ``N`` question ids.
    """
    if len(correct) != len(questions):
        raise ValueError(f"{len(correct)} outcomes for {len(questions)} question ids")
    if not correct:
        raise ValueError("no questions to score")
    by_question: dict[int, list[bool]] = defaultdict(list)
    for right, question in zip(correct, questions, strict=True):
        by_question[question].append(bool(right))
    n = len(by_question)
    return {
        "circular": 100.0 * sum(all(r) for r in by_question.values()) / n,
        "vanilla": 100.0 * sum(r[0] for r in by_question.values()) / n,
    }
