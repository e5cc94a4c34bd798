"""Audio-visual benchmarks: which streams each is asked with, and the partial-answer metric."""

import pytest

from mmfactory.data.benchmarks import AVBenchmark
from mmfactory.data.world_source import world_av_benchmarks
from mmfactory.eval.av import _mentions, ask


def test_partial_answers_count_the_parts_they_name():
    items = [
        {"keywords": {"color": "red", "shape": "star"}},
        {"keywords": {"color": "blue", "shape": "ring"}},
    ]
    got = _mentions(AVBenchmark("av_which", items, ("video", "audio")), ["A red star.", "Bluish ring"])
    assert got == {"av_which_mentions_color": 50.0, "av_which_mentions_shape": 100.0}
    assert _mentions(AVBenchmark("x", [{"answer": "a"}], ("video",)), ["a"]) == {}


def test_benchmarks_are_asked_with_the_streams_the_model_knows():
    sizes = {"video_qa": 2, "audio_qa": 2, "av_qa": 2, "audio_captions": 1}
    both = {b.name: b.streams for b in world_av_benchmarks(sizes, ["video", "audio"], frame_size=16)}
    assert both == {
        "video_qa": ("video",),
        "audio_qa": ("audio",),
        "av_qa": ("video", "audio"),
        "av_qa_video_alone": ("video",),
        "av_qa_audio_alone": ("audio",),
        "audio_captions": ("audio",),
    }
    video = {b.name: b.streams for b in world_av_benchmarks(sizes, ["video"], frame_size=16)}
    assert video == {"video_qa": ("video",), "av_qa": ("video",)}
    assert ask("q?", ("audio", "video"))[0]["content"] == "<video>\n<audio>\nq?"  # video first, always
    with pytest.raises(Exception, match="unknown audio-visual benchmarks"):
        world_av_benchmarks({"avqa": 1}, ["video"])
