"""The world's av-chat kinds: each carries the streams its placeholders ask for, asks what the world's own
QA items ask, renders media equal to the world's videos, and never asks the zero-shot question kind."""

from collections import Counter

import numpy as np
import pytest

from mmfactory.data.av import modality
from mmfactory.data.source_config import AV_WORLD_KINDS, SourceConfig
from mmfactory.data.sources import read_sources
from mmfactory.world import World


def read(kind: str, n: int = 12):
    return read_sources(
        [SourceConfig("world", kind=kind, size=n, image_size=16)], "av-chat", Counter(), "train"
    )


def test_every_kind_is_registered_and_carries_its_streams():
    for kind, streams in AV_WORLD_KINDS.items():
        samples = read(kind, 6)
        for i, item in enumerate(samples.items):
            assert modality(item["messages"]) == streams, kind
            media = samples.media(i)
            assert (media["video"] is not None) == (streams != "audio"), kind
            assert (media["audio"] is not None) == (streams != "video"), kind


@pytest.mark.parametrize(
    ("kind", "method"), [("video_qa", "video_qa"), ("av_qa", "av_qa"), ("audio_qa", "audio_qa")]
)
def test_questions_and_media_equal_the_worlds_own_items(kind, method):
    samples, world_items = read(kind), getattr(World(video_size=16), method)("train", 12)
    for i, (item, truth) in enumerate(zip(samples.items, world_items, strict=True)):
        question = item["messages"][0]["content"].split("\n")[-1]
        assert (question, item["messages"][1]["content"]) == (truth["question"], truth["answer"])
        media = samples.media(i)
        if kind != "audio_qa":
            assert np.array_equal(media["video"], truth["video"])
        if kind != "video_qa":
            assert np.array_equal(media["audio"], truth["audio"])


def test_no_training_kind_asks_the_zero_shot_question():
    asked = {
        m["content"].split("\n")[-1]
        for kind in AV_WORLD_KINDS
        for item in read(kind, 40).items
        for m in item["messages"]
        if m["role"] == "user"
    }
    assert "Which object is making a sound?" not in asked
    assert World().av_which("test", 10)[0]["question"] == "Which object is making a sound?"
