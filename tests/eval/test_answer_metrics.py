"""VQA accuracy, yes/no (POPE), MME acc / acc+ and MMBench CircularEval metrics on hand-made examples."""

import random

import pytest

from mmfactory.eval.metrics import (
    circular_accuracy,
    mme_scores,
    normalize_answer,
    parse_choice,
    parse_yes_no,
    vqa_accuracy,
    yes_no_metrics,
)


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("  The Red Square. ", "red square"),
        ("Two", "2"),
        ("a dog's bone", "dogs bone"),
        ("1,000 people!", "1000 people"),
        ("3.5", "3.5"),
        ("yes.", "yes"),
        ("none", "0"),
        ("red-and-blue", "red and blue"),
        ("An   apple", "apple"),
    ],
)
def test_normalize_answer(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_vqa_accuracy_with_question_types():
    predictions = ["Two", "the red square", "blue", "Yes.", "3 apples", "circle"]
    answers = ["2", "red square", "green", "yes", "three apples", ["circle", "round shape"]]
    question_types = ["count", "shape", "color", "yes/no", "count", "shape"]
    result = vqa_accuracy(predictions, answers, question_types)
    assert result["accuracy"] == pytest.approx(100 * 5 / 6)
    assert result["num"] == 6
    assert result["per_type"] == {
        "color": {"accuracy": 0.0, "num": 1},
        "count": {"accuracy": 100.0, "num": 2},
        "shape": {"accuracy": 100.0, "num": 2},
        "yes/no": {"accuracy": 100.0, "num": 1},
    }
    assert vqa_accuracy(["x"], ["y"])["per_type"] == {}
    assert vqa_accuracy([], []) == {"accuracy": 0.0, "num": 0, "per_type": {}}


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes, there is a dog.", "yes"),
        ("**No**", "no"),
        ("  no.", "no"),
        ("There is no dog.", None),
        ("Nope", None),
        ("Yesterday it rained", None),
        ("", None),
    ],
)
def test_parse_yes_no(text, parsed):
    assert parse_yes_no(text) == parsed


def test_yes_no_metrics_hand_computed():
    predictions = ["Yes", "yes, it is", "No", "I cannot tell", "Yes.", "no", "No, there is not", "maybe"]
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "No"]
    # parsed: yes yes no None | yes no no None -> TP 2, FP 1, TN 2, FN 2 (one a non-answer), 2 non-answers
    result = yes_no_metrics(predictions, labels)
    precision, recall = 2 / 3, 2 / 4
    assert result == pytest.approx(
        {
            "accuracy": 100 * 4 / 8,
            "precision": 100 * precision,
            "recall": 100 * recall,
            "f1": 100 * 2 * precision * recall / (precision + recall),
            "yes_ratio": 100 * 3 / 8,
            "num": 8,
            "num_non_answers": 2,
        }
    )


def test_yes_no_metrics_without_positive_predictions_and_bad_labels():
    result = yes_no_metrics(["no", "no"], ["yes", "no"])
    assert (result["precision"], result["recall"], result["f1"], result["accuracy"]) == (0.0, 0.0, 0.0, 50.0)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        yes_no_metrics(["yes"], ["maybe"])


def test_mme_acc_and_acc_plus_equal_a_naive_count():
    rng = random.Random(0)
    pairs = [i // 2 for i in range(40)]
    categories = [("existence", "count", "color")[p % 3] for p in pairs]
    correct = [rng.random() < 0.7 for _ in pairs]
    scores = mme_scores(correct, pairs, categories)
    assert scores["acc"] == pytest.approx(100 * sum(correct) / 40)
    both = [correct[2 * p] and correct[2 * p + 1] for p in range(20)]
    assert scores["acc_plus"] == pytest.approx(100 * sum(both) / 20)
    count_images = [p for p in range(20) if p % 3 == 1]
    assert scores["count_acc_plus"] == pytest.approx(
        100 * sum(both[p] for p in count_images) / len(count_images)
    )
    always_yes = [i % 2 == 0 for i in range(40)]  # right on every yes, wrong on every no
    assert mme_scores(always_yes, pairs, categories)["acc_plus"] == 0.0
    with pytest.raises(ValueError, match="two categories"):
        mme_scores([True, True], [0, 0], ["count", "color"])


def test_circular_accuracy_counts_a_question_only_if_every_rotation_is_right():
    rng = random.Random(1)
    questions = [i // 4 for i in range(48)]
    correct = [rng.random() < 0.8 for _ in questions]
    scores = circular_accuracy(correct, questions)
    naive = [all(correct[4 * q : 4 * q + 4]) for q in range(12)]
    assert scores["circular"] == pytest.approx(100 * sum(naive) / 12)
    assert scores["vanilla"] == pytest.approx(100 * sum(correct[4 * q] for q in range(12)) / 12)
    assert scores["circular"] <= scores["vanilla"]


@pytest.mark.parametrize(
    ("reply", "letter"),
    [("B", "B"), ("b.", "B"), ("(C) circle", "C"), (" D: red", "D"), ("C ", "C"), ("E", None), ("Blue", None)]
    + [("A red circle", None), ("a circle", None)],  # an article is not an option letter
)
def test_parse_choice(reply, letter):
    assert parse_choice(reply) == letter
