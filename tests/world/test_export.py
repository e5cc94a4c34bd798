import csv
import hashlib
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from mmfactory.world import World
from mmfactory.world.export import EXPORT_SIZES, export_world

TINY = {"image": 3, "image_eval": 2, "video": 2, "video_eval": 1, "text": 3, "text_eval": 2, "pool": 4}
SPLITS = ("train", "val", "test")
IMAGE_SPLITS = (*SPLITS, "test_compositional")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(EXPORT_SIZES, "tiny", TINY)
        root = tmp_path_factory.mktemp("world")
        counts = export_world(root / "a", size="tiny", seed=0)
        export_world(root / "b", size="tiny", seed=0)
    return root, counts


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_export_writes_every_file_of_the_layout(exported):
    root, counts = exported
    a = root / "a"
    expected = ["pool/pool.jsonl", "pool/truth.jsonl"]
    for split in IMAGE_SPLITS:
        expected += [f"llava/{split}.json", f"pairs/{split}.jsonl", f"pairs/shards/{split}-000000.tar"]
        expected += [f"vqa/{split}.jsonl"] + [
            f"pope/{split}_{k}.jsonl" for k in ("random", "popular", "adversarial")
        ]
    for split in SPLITS:
        expected += [f"ranking/{split}.jsonl", f"preference/{split}.jsonl", f"video/{split}.csv"]
        expected += [f"video/qa_{split}.jsonl", f"video/avqa_{split}.jsonl", f"audio/{split}.json"]
        expected += [f"audio/qa_{split}.jsonl", f"articles/{split}.jsonl", f"chat/{split}.jsonl"]
    assert not [f for f in expected if not (a / f).is_file()]
    assert (
        counts["llava/train.json"] == 3
        and counts["articles/val.jsonl"] == 4
        and counts["pool/pool.jsonl"] == 4
    )
    # every media path a record names exists, relative to the file holding the record
    for record_file in [*a.glob("*/*.jsonl"), *a.glob("*/*.json")]:
        text = record_file.read_text(encoding="utf-8")
        records = (
            json.loads(text) if record_file.suffix == ".json" else [json.loads(x) for x in text.splitlines()]
        )
        for r in records:
            for key in ("image", "audio"):
                if key in r:
                    assert (record_file.parent / r[key]).is_file(), (record_file, r[key])
    with (a / "video" / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all((a / "video" / "videos" / f"{r['video_id']}.mp4").is_file() for r in rows)


def test_export_is_byte_identical(exported):
    root, _ = exported
    assert _digests(root / "a") == _digests(root / "b")


def test_exported_media_round_trip(exported):
    a = exported[0] / "a"
    world = World(seed=0)
    item = world.llava("val", 1)[0]
    np.testing.assert_array_equal(
        np.asarray(Image.open(a / "llava" / "images" / "val-000000.png")), item["images"][0]
    )
    clip = world.audio_clips("train", 1)[0]
    audio, rate = soundfile.read(a / "audio" / "clips" / "train-000000.wav", dtype="float32")
    assert rate == 16000 and audio.shape == clip["audio"].shape
    np.testing.assert_allclose(audio, clip["audio"], atol=1 / 32767)
    video = world.videos("test", 1)[0]
    with av.open(str(a / "video" / "videos" / "test-000000.mp4")) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(a / "video" / "videos" / "test-000000.mp4")) as container:
        sound = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)]) / 32768.0
    np.testing.assert_array_equal(frames, video["video"])  # lossless RGB H.264
    np.testing.assert_allclose(sound[: len(video["audio"])], video["audio"], atol=1 / 16000)


def test_webdataset_shard_members(exported):
    with tarfile.open(exported[0] / "a" / "pairs" / "shards" / "train-000000.tar") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[:3] == ["train-000000.json", "train-000000.png", "train-000000.txt"]
        assert len(names) == 9 and all(m.mtime == 0 and m.uid == 0 for m in members)
        assert json.loads(tar.extractfile("train-000001.json").read()) == {"id": "train-000001"}


def test_llava_records_use_from_value_turns(exported):
    records = json.loads((exported[0] / "a" / "llava" / "train.json").read_text(encoding="utf-8"))
    turns = records[0]["conversations"]
    assert (
        turns[0]["from"] == "human"
        and turns[0]["value"].startswith("<image>\n")
        and turns[1]["from"] == "gpt"
    )


@pytest.mark.slow
def test_small_export_is_quick(tmp_path):
    import time

    start = time.perf_counter()
    counts = export_world(tmp_path, size="small")
    assert time.perf_counter() - start < 30 and counts["llava/train.json"] == 64
