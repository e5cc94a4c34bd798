"""`world export` -> the real-format readers gives back the world's own samples."""

import numpy as np
import pytest

from mmfactory.data import readers
from mmfactory.world import World
from mmfactory.world.export import export_world

PCM16_STEP = 1 / 32767 + 1e-6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    counts = export_world(root, size="small", seed=0)
    return root, counts


def _same_image_samples(read, made, keys):
    assert len(read) == len(made)
    for got, want in zip(read, made, strict=True):
        assert np.array_equal(got["image"], want["image"])
        for key in keys:
            assert got[key] == want[key], key


def test_image_formats_round_trip(exported):
    root, counts = exported
    world = World(seed=0)
    n = counts["vqa/val.jsonl"]
    _same_image_samples(
        readers.read_vqa(root / "vqa/val.jsonl"), world.vqa("val", n), ["question", "answer", "type"]
    )
    _same_image_samples(readers.read_pairs(root / "pairs/val.jsonl"), world.pairs("val", n), ["text"])
    for kind in ("random", "popular", "adversarial"):
        _same_image_samples(
            readers.read_pope(root / f"pope/val_{kind}.jsonl"),
            world.pope("val", n, kind),
            ["question", "label"],
        )
    _same_image_samples(
        readers.read_rankings(root / "ranking/val.jsonl"), world.rankings("val", n), ["captions", "ranks"]
    )
    _same_image_samples(
        readers.read_preference(root / "preference/val.jsonl"),
        world.preference("val", n),
        ["prompt", "chosen", "rejected"],
    )
    shards = sorted((root / "pairs/shards").glob("val-*.tar"))
    _same_image_samples(readers.read_webdataset(shards), world.pairs("val", n), ["text"])

    llava = readers.read_llava(root / "llava/val.json")
    made = world.llava("val", n)
    for got, want in zip(llava, made, strict=True):
        assert got["conversations"] == want["conversations"]
        assert len(got["images"]) == 1 and np.array_equal(got["images"][0], want["images"][0])


def test_video_and_audio_round_trip(exported):
    root, counts = exported
    world = World(seed=0)
    videos = world.videos("val", counts["video/qa_val.jsonl"])
    read = readers.read_video_captions(root / "video/val.csv", num_frames=world.video_frames, with_audio=True)
    assert len(read) == len(videos)
    for got, want in zip(read, videos, strict=True):
        assert np.array_equal(got["video"], want["video"])  # lossless RGB H.264
        assert got["captions"] == want["captions"]
        assert got["sample_rate"] == want["sample_rate"]
        assert np.abs(got["audio"] - want["audio"]).max() <= PCM16_STEP

    clips = world.audio_clips("val", counts["audio/val.json"])
    read = readers.read_audio_captions(root / "audio/val.json")
    for got, want in zip(read, clips, strict=True):
        assert got["caption"] == want["caption"] and got["sample_rate"] == want["sample_rate"]
        assert np.abs(got["audio"] - want["audio"]).max() <= PCM16_STEP


def test_text_formats_round_trip(exported):
    root, counts = exported
    world = World(seed=0)
    chats = readers.read_chat(root / "chat/val.jsonl")
    assert [c["messages"] for c in chats] == [
        c["messages"] for c in world.chat("val", counts["chat/val.jsonl"])
    ]
    articles = {a["id"]: a for a in readers.read_articles(root / "articles/val.jsonl")}
    for lang in ("en", "zh"):
        for made in world.articles("val", counts["articles/val.jsonl"] // 2, lang):
            got = articles[made["id"]]
            assert (got["facts"], got["draft"], got["reference"]) == (
                made["facts"],
                made["draft"],
                made["reference"],
            )
