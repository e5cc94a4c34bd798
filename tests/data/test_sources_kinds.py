"""The labelled-image, preference, article and video-text formats on the source layer: each read from a
real file, bad records as errors naming file and record or counted skips, world settings that cannot
apply refused before anything is read."""

from collections import Counter

import numpy as np
import pytest

from mmfactory.config import ConfigError, from_dict
from mmfactory.data.images import FittedImages
from mmfactory.data.policy import BadSampleError
from mmfactory.data.preference import preference_pairs
from mmfactory.data.source_config import SourceConfig
from mmfactory.data.sources import read_sources
from mmfactory.data.video_text import video_clip
from tests.data.test_images import idx_bytes, write_pair


def read(sample_kind: str, prefix: str = "train", **raw):
    counts = Counter()
    source = from_dict(SourceConfig, raw, "source")
    return read_sources([source], sample_kind, counts, prefix, report=False), counts


def test_idx_images_are_read_as_stored_and_fitted_by_the_task(files):
    pixels = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    images, labels = write_pair(
        files, idx_bytes(0x08, [3, 4, 4], pixels.tobytes()), idx_bytes(0x08, [3], b"\x02\x00\x01"), gz=True
    )
    samples, _ = read("labelled-image", format="idx", path=str(images), labels=str(labels))
    assert samples.classes == ["0", "1", "2"] and [i["label"] for i in samples.items] == [2, 0, 1]
    assert np.array_equal(samples.media(1), pixels[1])  # grey [H, W], as stored
    fitted = FittedImages(samples, 8, 3)[1]
    assert fitted["image"].shape == (8, 8, 3) and fitted["label"] == 0


def test_preference_pairs_kto_rows_and_image_root(files):
    files.png("images/a.png")
    path = files.jsonl(
        "prefs/p.jsonl",
        [
            {
                "id": 1,
                "prompt": "<image>\nWhat is it?",
                "chosen": "a dot",
                "rejected": "a cat",
                "image": "a.png",
            },
            {"id": 2, "prompt": "Hi", "completion": "Hello", "label": True},
            {"id": 3, "prompt": "Hi", "completion": "Go away", "chosen": "x", "label": False},
            {"id": 4, "prompt": "Hi", "chosen": "same", "rejected": "same"},
        ],
    )
    root = str(files.root / "images")
    with pytest.raises(BadSampleError, match=r"p.jsonl, line 3 \(id 3\): a row is a pair"):
        read("preference", format="preference", path=str(path), image_root=root)
    samples, counts = read(
        "preference", format="preference", path=str(path), image_root=root, on_bad_sample="skip"
    )
    assert samples.items == [
        {"id": 1, "prompt": "<image>\nWhat is it?", "chosen": "a dot", "rejected": "a cat"},
        {"id": 2, "prompt": "Hi", "completion": "Hello", "label": True},
    ]
    assert counts == {"train/bad_invalid_record": 2}
    assert samples.media(0)[0].shape == (12, 16, 3) and samples.media(1) == []
    with pytest.raises(ConfigError, match="sample 2 is an unpaired KTO row"):
        preference_pairs(samples, "data.train", images=None)
    assert preference_pairs(samples.first(1), "data.train", images=True)[0]["image"].shape == (12, 16, 3)


def test_articles_keep_the_languages_asked_for_and_count_the_others(files):
    rows = [
        {"id": "a", "lang": "en", "facts": {"colour": "red"}, "draft": "Red.", "reference": "✨ Red ✨"},
        {"id": "b", "lang": "zh", "reference": "红色"},
        {"id": "c", "lang": "fr", "reference": "rouge"},
    ]
    path = str(files.jsonl("articles.jsonl", rows))
    every, _ = read("article", format="articles", path=path, on_bad_sample="skip")
    assert [a["id"] for a in every.items] == ["a", "b"] and every.items[1]["draft"] is None
    english, counts = read("article", format="articles", path=path, languages=["en"], on_bad_sample="skip")
    assert [a["id"] for a in english.items] == ["a"]
    assert counts == {"train/other_language": 1, "train/bad_invalid_record": 1}


def test_csv_videos_are_checked_when_read_and_decoded_when_drawn(files):
    frames = files.solid_frames(6)
    files.mp4("clips/v0.mp4", frames)
    path = files.text("captions.csv", "video_id,sentence\nv0,a clip\nv0,another\nv1,missing\n")
    samples, counts = read(
        "video-text", format="csv", path=str(path), video_root=str(files.root / "clips"), on_bad_sample="skip"
    )
    assert samples.items == [{"video_id": "v0", "captions": ["a clip", "another"]}]
    assert counts == {"train/bad_missing_file": 1}
    assert video_clip(samples.media(0), 3, "uniform", None).shape == (3, 32, 48, 3)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"format": "world", "kind": "labelled", "languages": ["zh"]},
            "world's labelled samples are English only",
        ),
        ({"format": "world", "kind": "videos", "offset": 5}, "only the world's articles start at an offset"),
        ({"format": "idx", "path": "x"}, "labels: format 'idx' needs the labels file"),
        ({"format": "csv", "path": "x", "labels": "y"}, "labels: not read by format 'csv'"),
        (
            {
                "format": "preference",
                "path": "x",
                "limit": 3,
                "subset": "random",
                "seed": 1,
                "check_media": True,
            },
            "check_media: not read",
        ),
        ({"format": "world", "kind": "articles", "subset": "random"}, "subset: random draws `limit` samples"),
    ],
)
def test_settings_a_format_does_not_read_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(SourceConfig, raw, "source")


def test_a_random_subset_is_seeded_and_kept_in_order():
    world = {"format": "world", "kind": "labelled", "size": 40}
    full, _ = read("labelled-image", **world)
    picked = [read("labelled-image", **world, limit=10, subset="random")[0] for _ in range(2)]
    every = [full.media(i).tobytes() for i in range(40)]
    positions = [every.index(picked[0].media(i).tobytes()) for i in range(10)]
    assert positions == sorted(positions) and positions != list(range(10))  # in order, not the first ten
    assert [picked[1].media(i).tobytes() for i in range(10)] == [every[p] for p in positions]  # seeded


def test_rankings_jsonl_with_image_root_and_bad_rankings_counted(files):
    files.png("imgs/a.png")
    rows = [
        {"id": "r0", "image": "a.png", "captions": ["a dot", "a cat", "a red dot"], "ranks": [2, 3, 1]},
        {"id": "r1", "image": "a.png", "captions": ["alone"], "ranks": [1]},
        {"id": "r2", "image": "a.png", "captions": ["x", "y"], "ranks": [1, 0]},
    ]
    path = str(files.jsonl("rankings.jsonl", rows))
    root = str(files.root / "imgs")
    with pytest.raises(BadSampleError, match=r"line 2 \(id 'r1'\): a ranking needs at least 2 captions"):
        read("ranking", format="rankings", path=path, image_root=root)
    samples, counts = read("ranking", format="rankings", path=path, image_root=root, on_bad_sample="skip")
    assert samples.items == [{"id": "r0", "captions": ["a dot", "a cat", "a red dot"], "ranks": [2, 3, 1]}]
    assert counts == {"train/bad_invalid_ranks": 2} and samples.media(0).shape == (12, 16, 3)
