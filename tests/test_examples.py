"""Stage examples: written and read back with their images, right and wrong ones balanced, marks
highlighted in the report."""

import numpy as np
from PIL import Image

from mmfactory.examples import Example, read_examples, retrieval_examples, right_and_wrong, write_examples
from mmfactory.report.page import _marked


def test_examples_round_trip_with_images(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    gray = Image.fromarray(np.full((3, 3), 7, dtype=np.uint8))
    shown = [
        Example("a", {"q": "what?", "answer": "red"}, [rgb, gray], correct=True),
        Example("b", {"x": "y"}),
    ]
    write_examples(tmp_path, "VQA answers", shown)
    write_examples(tmp_path, "Other group", [Example("c", {"k": "v"}, marks={"k": ["v"]})])
    groups = read_examples(tmp_path)
    assert list(groups) == ["Other group", "VQA answers"]  # file-name order
    first = groups["VQA answers"][0]
    assert first["fields"] == {"q": "what?", "answer": "red"} and first["correct"] is True
    assert np.array_equal(np.asarray(Image.open(first["images"][0])), rgb)
    assert np.asarray(Image.open(first["images"][1])).tolist() == [[7] * 3] * 3
    assert groups["VQA answers"][1]["images"] == [] and groups["VQA answers"][1]["correct"] is None
    assert groups["Other group"][0]["marks"] == {"k": ["v"]}


def test_right_and_wrong_balances_when_both_exist():
    made = [Example(str(i), {}, correct=i % 3 == 0) for i in range(12)]  # 4 right, 8 wrong
    picked = right_and_wrong(made, 6)
    assert [e.correct for e in picked] == [True] * 3 + [False] * 3
    only_wrong = [Example(str(i), {}, correct=False) for i in range(5)]
    assert len(right_and_wrong(only_wrong, 4)) == 4
    few_right = [Example("r", {}, correct=True)] + only_wrong
    assert [e.correct for e in right_and_wrong(few_right, 4)] == [True, False, False, False]


def test_retrieval_examples_rank_and_mark_the_true_item():
    import torch

    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.3, 0.7]])  # [T, I]
    shown = retrieval_examples(
        similarity, ["t0", "t1", "t2"], [0, 1, 2], lambda i: np.full((2, 2, 3), i, np.uint8), k=2
    )
    assert [e.correct for e in shown] == [True, False, True]
    assert "ranks 2" in shown[1].fields["retrieved"]
    assert [int(img[0, 0, 0]) for img in shown[1].images] == [0, 1]  # top 2 of caption t1: items 0, 1


def test_marks_are_highlighted_and_everything_is_escaped():
    out = _marked("price <b>$20</b>, colour red, red again", ["red", "$20"])
    assert out == "price &lt;b&gt;<mark>$20</mark>&lt;/b&gt;, colour <mark>red</mark>, <mark>red</mark> again"
    assert _marked("a < b", []) == "a &lt; b"
