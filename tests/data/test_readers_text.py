"""Readers of text-centred formats: preference, caption rankings, articles, chat, VQA and POPE."""

import numpy as np
import pytest
from PIL import Image

from mmfactory.data.policy import BadReason, BadSampleCounter
from mmfactory.data.readers import (
    ranking_to_pairs,
    read_articles,
    read_chat,
    read_pope,
    read_preference,
    read_rankings,
    read_vqa,
)


def _ids(dataset) -> list:
    return [dataset[i]["id"] for i in range(len(dataset))]


def test_preference_with_and_without_image(files, bad_sample):
    image = files.png("preference/images/a.png")
    path = files.jsonl(
        "preference/train.jsonl",
        [
            {
                "id": "q0",
                "prompt": "Describe.",
                "chosen": "A red dot.",
                "rejected": "A blue cat.",
                "image": "images/a.png",
            },
            {"id": "q1", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
            {"id": "q2", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"},
            {"id": "q3", "prompt": "Say hi.", "chosen": "", "rejected": "Go away."},
        ],
    )
    error = bad_sample(read_preference, path)
    assert error.reason is BadReason.INVALID_RECORD
    assert str(error) == f"{path}, line 3 (id 'q2'): 'chosen' and 'rejected' are identical"
    dataset = read_preference(path, on_bad_sample="skip")
    assert _ids(dataset) == ["q0", "q1"] and dataset.counter.summary() == {
        "empty_text": 1,
        "invalid_record": 1,
    }
    np.testing.assert_array_equal(dataset[0]["image"], np.asarray(Image.open(image)))
    assert dataset[1]["image"] is None and dataset[1]["chosen"] == "Hi!"


def test_ranking_to_pairs_orders_better_before_worse_and_drops_ties():
    assert ranking_to_pairs([2, 1, 2, 3]) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]
    assert ranking_to_pairs([1, 1]) == [] and ranking_to_pairs([1]) == []
    # D > A > C = B as in Filter & Align: ranks A=2, B=3, C=3, D=1
    assert sorted(ranking_to_pairs([2, 3, 3, 1])) == [(0, 1), (0, 2), (3, 0), (3, 1), (3, 2)]
    for bad in ([0, 1], [1, -2], [1, True], [1, 2.0]):
        with pytest.raises(ValueError, match="ranks must be positive ints"):
            ranking_to_pairs(bad)


def test_rankings_validate_ranks_against_captions(files, bad_sample):
    files.png("ranking/images/a.png")
    caps = ["a red circle", "a circle", "a blue square"]
    path = files.jsonl(
        "ranking/train.jsonl",
        [
            {"id": "r0", "image": "images/a.png", "captions": caps, "ranks": [1, 2, 3]},
            {"id": "r1", "image": "images/a.png", "captions": caps, "ranks": [1, 2]},
            {"id": "r2", "image": "images/a.png", "captions": caps, "ranks": [1, 0, 2]},
            {"id": "r3", "image": "images/a.png", "captions": ["ok", "", "fine"], "ranks": [1, 2, 3]},
            {"id": "r4", "image": "images/a.png", "captions": caps, "ranks": [2, 1, 2]},
        ],
    )
    error = bad_sample(read_rankings, path)
    assert error.reason is BadReason.INVALID_RANKS
    assert str(error) == (
        f"{path}, line 2 (id 'r1'): 'ranks' must be a list with one rank per caption (3), got [1, 2]"
    )
    counter = BadSampleCounter()
    dataset = read_rankings(path, on_bad_sample="skip", counter=counter)
    assert _ids(dataset) == ["r0", "r4"] and counter.summary() == {"empty_text": 1, "invalid_ranks": 2}
    assert counter.examples["invalid_ranks"] == [f"{path}, line 2 (id 'r1')", f"{path}, line 3 (id 'r2')"]
    assert dataset[0]["pairs"] == [(0, 1), (0, 2), (1, 2)] and dataset[1]["pairs"] == [(1, 0), (1, 2)]
    assert dataset[0]["image"].shape == (12, 16, 3)


def test_articles(files, bad_sample):
    good = {"id": "a0", "lang": "zh", "facts": {"价格": "99元"}, "draft": "草稿", "reference": "笔记"}
    path = files.jsonl(
        "articles/train.jsonl",
        [
            good,
            {**good, "id": "a1", "lang": "fr"},
            {**good, "id": "a2", "draft": ""},
            {**good, "id": "a3", "facts": ["price"]},
        ],
    )
    error = bad_sample(read_articles, path)
    assert str(error) == f"{path}, line 2 (id 'a1'): 'lang' must be one of ('en', 'zh'), got 'fr'"
    dataset = read_articles(path, on_bad_sample="skip")
    assert [dataset[i] for i in range(len(dataset))] == [good]
    assert dataset.counter.summary() == {"empty_text": 1, "invalid_record": 2}


def test_chat(files, bad_sample):
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    path = files.jsonl(
        "chat/train.jsonl",
        [
            {"id": "c0", "messages": messages},
            {"id": "c1", "messages": messages[:2]},
            {"id": "c2", "messages": [{"role": "bot", "content": "Hi"}]},
            {"id": "c3", "messages": []},
        ],
    )
    error = bad_sample(read_chat, path)
    assert str(error) == f"{path}, line 2 (id 'c1'): 'messages' has no assistant turn"
    dataset = read_chat(path, on_bad_sample="skip")
    assert dataset[0] == {"id": "c0", "messages": messages} and len(dataset) == 1
    assert dataset.counter.summary() == {"invalid_record": 3}


def test_vqa_and_pope_resolve_images_relative_to_their_file(files, bad_sample):
    image = files.png("llava/images/x.png")
    vqa = files.jsonl(
        "vqa/test.jsonl",
        [
            {
                "id": "v0",
                "image": "../llava/images/x.png",
                "question": "Colour?",
                "answer": "red",
                "type": "color",
            },
            {
                "id": "v1",
                "image": "../llava/images/x.png",
                "question": "Colour?",
                "answer": "",
                "type": "color",
            },
        ],
    )
    dataset = read_vqa(vqa, on_bad_sample="skip")
    assert _ids(dataset) == ["v0"] and dataset.counter.summary() == {"empty_text": 1}
    np.testing.assert_array_equal(dataset[0]["image"], np.asarray(Image.open(image)))
    assert dataset[0]["answer"] == "red" and dataset[0]["type"] == "color"
    pope = files.jsonl(
        "pope/test_random.jsonl",
        [
            {
                "id": "p0",
                "image": "../llava/images/x.png",
                "question": "Is there a cat?",
                "label": "no",
                "object": "cat",
            },
            {
                "id": "p1",
                "image": "../llava/images/x.png",
                "question": "Is there a cat?",
                "label": "Yes",
                "object": "cat",
            },
        ],
    )
    error = bad_sample(read_pope, pope)
    assert str(error) == f"{pope}, line 2 (id 'p1'): 'label' must be 'yes' or 'no', got 'Yes'"
    dataset = read_pope(pope, on_bad_sample="skip")
    assert _ids(dataset) == ["p0"] and dataset[0]["label"] == "no" and dataset[0]["object"] == "cat"
