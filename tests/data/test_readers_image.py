"""Readers of image formats: pairs JSONL, LLaVA JSON, webdataset shards; DataLoader use."""

import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mmfactory.data.policy import BadReason, BadSampleCounter
from mmfactory.data.readers import read_llava, read_pairs, read_webdataset

GOOD_PAIR = {"id": "p0", "image": "images/0.png", "text": "a red circle"}
# (line, reason, problem as the message ends; {images} is the images folder)
BAD_PAIRS = [
    (
        {"id": "p1", "image": "images/bad.png", "text": "a blue square"},
        BadReason.CORRUPT_IMAGE,
        " (id 'p1'): {images}/bad.png: cannot decode image: ",
    ),
    (
        {"id": "p2", "image": "images/none.png", "text": "a star"},
        BadReason.MISSING_FILE,
        " (id 'p2'): image file '{images}/none.png' not found",
    ),
    ('{"id": "p3", "image": "images/0.png", "text": ', BadReason.MALFORMED_JSON, ": malformed JSON: "),
    (
        {"id": "p4", "image": "images/0.png", "text": "  "},
        BadReason.EMPTY_TEXT,
        " (id 'p4'): 'text' is empty",
    ),
    ({"id": "p5", "image": "images/0.png"}, BadReason.INVALID_RECORD, " (id 'p5'): missing field 'text'"),
]


def _pair_images(files):
    files.png("pairs/images/0.png", seed=0)
    files.png("pairs/images/1.png", seed=1)
    files.truncated("pairs/images/bad.png", files.png("pairs/source.png"))
    return files.root / "pairs/images"


@pytest.mark.parametrize(("line", "reason", "problem"), BAD_PAIRS, ids=[reason for _, reason, _ in BAD_PAIRS])
def test_pairs_error_names_file_line_and_problem(files, bad_sample, line, reason, problem):
    images = _pair_images(files)
    path = files.jsonl("pairs/train.jsonl", [GOOD_PAIR, line])
    error = bad_sample(read_pairs, path)
    assert error.reason is reason
    assert str(error).startswith(f"{path}, line 2" + problem.format(images=images))


def test_pairs_skip_keeps_good_samples_and_counts_bad_by_reason(files):
    images = _pair_images(files)
    last = {"id": "p6", "image": "images/1.png", "text": "two yellow triangles"}
    path = files.jsonl("pairs/train.jsonl", [GOOD_PAIR, *(line for line, _, _ in BAD_PAIRS), last])
    counter = BadSampleCounter()
    dataset = read_pairs(path, on_bad_sample="skip", counter=counter)
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["p0", "p6"]
    assert dataset.counter is counter
    assert counter.summary() == {reason.value: 1 for _, reason, _ in BAD_PAIRS}
    assert counter.examples["malformed_json"] == [f"{path}, line 4"]
    sample = dataset[1]
    assert sample["text"] == "two yellow triangles"
    np.testing.assert_array_equal(sample["image"], np.asarray(Image.open(images / "1.png")))


def test_pairs_read_the_web_pool_by_uid(files):
    files.png("pool/images/u.png")
    path = files.jsonl("pool/pool.jsonl", [{"uid": "u1", "image": "images/u.png", "text": "a cat"}])
    assert read_pairs(path, id_field="uid")[0].keys() == {"uid", "image", "text"}


def test_media_failing_at_access_raises_under_skip_naming_file_and_record(files, bad_sample):
    """check_media=False defers decoding: a corrupt image then fails in dataset[i], policy or not."""
    images = _pair_images(files)
    path = files.jsonl("pairs/train.jsonl", [GOOD_PAIR, BAD_PAIRS[0][0]])
    dataset = read_pairs(path, on_bad_sample="skip", check_media=False)
    assert len(dataset) == 2 and dataset.counter.total == 0
    error = bad_sample(dataset.__getitem__, 1)
    assert str(error).startswith(f"{path}, line 2 (id 'p1'): {images}/bad.png: cannot decode image")
    # In a DataLoader worker, torch re-raises it as a RuntimeError carrying the same message.
    with pytest.raises(RuntimeError, match=r"line 2 \(id 'p1'\): .*bad.png: cannot decode image"):
        list(DataLoader(dataset, num_workers=1, collate_fn=list))


def test_dataset_pickles_and_loads_in_dataloader_workers(files):
    _pair_images(files)
    path = files.jsonl("pairs/train.jsonl", [{**GOOD_PAIR, "id": f"p{i}"} for i in range(5)])
    dataset = read_pairs(path)
    assert len(pickle.loads(pickle.dumps(dataset))) == 5
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=list)
    batches = list(loader)
    assert [[s["id"] for s in batch] for batch in batches] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert batches[0][0]["image"].shape == (12, 16, 3)


# --- LLaVA ----------------------------------------------------------------------------------------


def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(values)]


def test_llava_converts_roles_and_decodes_images(files):
    a, b = files.png("llava/images/a.png", seed=1), files.png("llava/images/b.png", seed=2)
    path = files.json(
        "llava/train.json",
        [
            {
                "id": "one",
                "image": "images/a.png",
                "conversations": _turns("<image>\nWhat is it?", "A circle."),
            },
            {
                "id": "two",
                "image": ["images/a.png", "images/b.png"],
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    *_turns("<image> vs <image>?", "Same."),
                ],
            },
            {"id": "text", "conversations": _turns("Hi", "Hello!", "Bye", "Bye!")},
        ],
    )
    dataset = read_llava(path)
    one, two, text = (dataset[i] for i in range(3))
    assert one["conversations"] == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A circle."},
    ]
    np.testing.assert_array_equal(one["images"][0], np.asarray(Image.open(a)))
    assert [m["role"] for m in two["conversations"]] == ["system", "user", "assistant"]
    np.testing.assert_array_equal(two["images"][1], np.asarray(Image.open(b)))
    assert text["images"] == [] and len(text["conversations"]) == 4


def test_llava_bad_records(files, bad_sample):
    files.png("llava/images/a.png")
    records = [
        {"id": "ok", "image": "images/a.png", "conversations": _turns("<image>\nWhat?", "A dot.")},
        {"id": "no-slot", "image": "images/a.png", "conversations": _turns("What?", "A dot.")},
        {"id": "extra-slot", "conversations": _turns("<image> what?", "A dot.")},
        {"id": "bot", "image": "images/a.png", "conversations": [{"from": "bot", "value": "<image>"}]},
        {"id": "silent", "image": "images/a.png", "conversations": _turns("<image>\nWhat?", "")},
        {"id": "gone", "image": "images/zzz.png", "conversations": _turns("<image>\nWhat?", "A dot.")},
    ]
    path = files.json("llava/train.json", records)
    error = bad_sample(read_llava, path)
    assert error.reason is BadReason.PLACEHOLDER_MISMATCH
    assert str(error) == f"{path}, index 1 (id 'no-slot'): 0 <image> placeholders for 1 images"
    dataset = read_llava(path, on_bad_sample="skip")
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["ok"]
    assert dataset.counter.summary() == {
        "empty_text": 1,
        "invalid_record": 1,
        "missing_file": 1,
        "placeholder_mismatch": 2,
    }
    assert dataset.counter.examples["empty_text"] == [f"{path}, index 4 (id 'silent')"]


def test_llava_unparseable_file_raises_under_skip(files, bad_sample):
    path = files.text("llava/train.json", '[{"id": "a", ')
    error = bad_sample(read_llava, path, on_bad_sample="skip")
    assert error.reason is BadReason.MALFORMED_JSON and str(error).startswith(f"{path}: malformed JSON")


# --- webdataset -----------------------------------------------------------------------------------


def _png_bytes(files, name: str, seed: int) -> bytes:
    return files.png(f"raw/{name}.png", seed=seed).read_bytes()


def test_webdataset_groups_members_by_key_and_decodes(files):
    first, second = _png_bytes(files, "a", 1), _png_bytes(files, "b", 2)
    shard0 = files.tar(
        "shards/train-000000.tar",
        [
            ("k0.png", first),
            ("k0.txt", b"a red circle"),
            ("k0.json", b'{"id": "s0"}'),
            ("part/k1.png", second),
            ("part/k1.txt", b"un cercle rouge"),
        ],
    )
    shard1 = files.tar("shards/train-000001.tar", [("k2.txt", b"two dots"), ("k2.png", first)])
    dataset = read_webdataset([shard0, shard1])
    samples = [dataset[i] for i in range(len(dataset))]
    assert [(s["id"], s["key"], s["text"]) for s in samples] == [
        ("s0", "k0", "a red circle"),
        ("part/k1", "part/k1", "un cercle rouge"),
        ("k2", "k2", "two dots"),
    ]
    np.testing.assert_array_equal(samples[1]["image"], np.asarray(Image.open(files.root / "raw/b.png")))
    assert dataset.records[2].file == shard1


def test_webdataset_bad_samples_and_truncated_shard(files, bad_sample):
    good = _png_bytes(files, "a", 1)
    members = [
        ("k0.png", good),
        ("k0.txt", b"fine"),
        ("k1.png", good[: len(good) // 2]),
        ("k1.txt", b"truncated image"),
        ("k2.png", good),
        ("k2.txt", b" "),
        ("k3.png", good),
        ("k4.png", good),
        ("k4.txt", b"bad json"),
        ("k4.json", b"{id"),
        ("k5.png", good),
        ("k5.txt", b"also fine"),
    ]
    shard = files.tar("train-000000.tar", members)
    error = bad_sample(read_webdataset, shard)
    assert error.reason is BadReason.CORRUPT_IMAGE
    assert str(error).startswith(f"{shard}, sample 'k1': cannot decode image: ")
    dataset = read_webdataset(shard, on_bad_sample="skip")
    assert [dataset[i]["key"] for i in range(len(dataset))] == ["k0", "k5"]
    assert dataset.counter.summary() == {
        "corrupt_image": 1,
        "empty_text": 1,
        "malformed_json": 1,
        "missing_file": 1,
    }
    # Cut inside k5.png's data: k0..k4 are read, the rest of the shard is one corrupt_archive.
    with tarfile.open(shard) as tar:
        k5_png = tar.getmember("k5.png")
    cut = files.truncated("cut-000000.tar", shard, keep=k5_png.offset_data + 100)
    dataset = read_webdataset(cut, on_bad_sample="skip")
    assert [dataset[i]["key"] for i in range(len(dataset))] == ["k0"]
    assert dataset.counter.summary() == {
        "corrupt_archive": 1,
        "corrupt_image": 1,
        "empty_text": 1,
        "malformed_json": 1,
        "missing_file": 1,
    }
    assert dataset.counter.examples["corrupt_archive"] == [f"{cut}, archive"]
    error = bad_sample(read_webdataset, cut, on_bad_sample="error")
    assert error.reason is BadReason.CORRUPT_IMAGE  # k1 comes first
