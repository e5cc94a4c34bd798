"""Labelled images: hand-written IDX files (plain, gzipped, corrupt, truncated), image folders with a
corrupt file, and the world's scene labels."""

import gzip
import struct

import numpy as np
import pytest

from mmfactory.data.images import fit_image, read_idx, read_idx_file, read_image_folder
from mmfactory.data.policy import BadSampleCounter
from mmfactory.data.world_source import world_labelled_images

PIXELS = bytes(range(0, 240, 20))  # three 2x2 images: [[0, 20], [40, 60]], [[80, 100], ...], ...


def idx_bytes(type_byte: int, dims: list[int], payload: bytes) -> bytes:
    return bytes([0, 0, type_byte, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_pair(files, images: bytes, labels: bytes, gz: bool = False):
    wrap = gzip.compress if gz else (lambda data: data)
    suffix = ".gz" if gz else ""
    image_path = files.root / f"images-idx3-ubyte{suffix}"
    label_path = files.root / f"labels-idx1-ubyte{suffix}"
    image_path.write_bytes(wrap(images))
    label_path.write_bytes(wrap(labels))
    return image_path, label_path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_hand_written_files(files, gz):
    images, labels = write_pair(
        files, idx_bytes(0x08, [3, 2, 2], PIXELS), idx_bytes(0x08, [3], bytes([2, 0, 1])), gz
    )
    dataset, class_names = read_idx(images, labels)
    assert class_names == ["0", "1", "2"] and len(dataset) == 3
    assert dataset[0]["image"].tolist() == [[[0], [20]], [[40], [60]]] and dataset[0]["label"] == 2
    assert dataset[2]["image"][..., 0].tolist() == [[160, 180], [200, 220]] and dataset[2]["label"] == 1
    rgb, _ = read_idx(images, labels, channels=3)
    assert rgb[1]["image"].shape == (2, 2, 3) and rgb[1]["image"][0, 1].tolist() == [100, 100, 100]


def test_idx_reads_big_endian_wider_types(files):
    path = files.root / "floats.idx"
    path.write_bytes(idx_bytes(0x0D, [2, 3], np.arange(6, dtype=">f4").tobytes()))
    array, declared = read_idx_file(path)
    assert declared == 2 and array.dtype == np.float32 and array.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x1f\x8b\x08\x00garbage-not-deflate", "corrupt gzip stream"),
        (idx_bytes(0x07, [3, 2, 2], PIXELS), "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "header for 3 dimensions is cut off"),
        (idx_bytes(0x08, [3, 2, 2], PIXELS + b"\x00\x00"), "2 bytes after the 3 records"),
    ],
)
def test_unreadable_idx_files_raise_under_either_policy(files, bad_sample, content, problem):
    images, labels = write_pair(files, content, idx_bytes(0x08, [3], bytes(3)))
    for policy in ("error", "skip"):
        error = bad_sample(read_idx, images, labels, on_bad_sample=policy)
        assert str(images) in str(error) and problem in str(error)


def test_truncated_idx_records_error_or_are_skipped_and_counted(files, bad_sample):
    images, labels = write_pair(
        files, idx_bytes(0x08, [3, 2, 2], PIXELS[:7]), idx_bytes(0x08, [3], bytes([1, 1, 0]))
    )
    error = bad_sample(read_idx, images, labels)
    assert str(error) == f"{images}, record 1: truncated: 3 of 4 bytes (1/3 records whole)"
    assert error.reason == "corrupt_image"
    counter = BadSampleCounter()
    dataset, _ = read_idx(images, labels, on_bad_sample="skip", counter=counter)
    assert len(dataset) == 1 and dataset[0]["label"] == 1
    assert counter.summary() == {"corrupt_image": 2}
    assert counter.examples["corrupt_image"] == [f"{images}, record 1", f"{images}, record 2"]


def test_truncated_gzip_stream_keeps_its_whole_records(files):
    images, labels = write_pair(
        files, idx_bytes(0x08, [3, 2, 2], PIXELS), idx_bytes(0x08, [3], bytes(3)), gz=True
    )
    images.write_bytes(gzip.compress(idx_bytes(0x08, [3, 2, 2], PIXELS))[:-12])  # cut the stream's tail
    counter = BadSampleCounter()
    dataset, _ = read_idx(images, labels, on_bad_sample="skip", counter=counter)
    assert 0 < len(dataset) < 3 and counter.total == 3 - len(dataset)


def test_idx_headers_that_disagree_raise(files, bad_sample):
    images, labels = write_pair(files, idx_bytes(0x08, [3, 2, 2], PIXELS), idx_bytes(0x08, [2], bytes(2)))
    error = bad_sample(read_idx, images, labels, on_bad_sample="skip")
    assert "(declared 3) and labels [2] (declared 2) do not pair up" in str(error)


def test_image_folder_classes_labels_and_a_corrupt_file(files, bad_sample):
    files.png("train/dog/a.png", seed=1)
    files.png("train/cat/b.png", seed=2, size=(20, 10))
    files.png("train/cat/c.jpg.png", seed=3)
    files.text("train/cat/notes.txt", "not an image")  # ignored: no image extension
    files.random_bytes("train/dog/broken.png", size=64)
    error = bad_sample(read_image_folder, files.root / "train", image_size=8)
    assert "train, dog/broken.png:" in str(error) and "cannot decode image" in str(error)
    counter = BadSampleCounter()
    dataset, names = read_image_folder(
        files.root / "train", image_size=8, on_bad_sample="skip", counter=counter
    )
    assert names == ["cat", "dog"] and counter.summary() == {"corrupt_image": 1}
    assert [dataset[i]["label"] for i in range(len(dataset))] == [0, 0, 1]
    assert all(
        dataset[i]["image"].shape == (8, 8, 3) and dataset[i]["image"].dtype == np.uint8 for i in range(3)
    )

    files.png("val/dog/d.png", seed=4)
    val, val_names = read_image_folder(files.root / "val", class_names=names, channels=1)
    assert val_names == ["cat", "dog"] and val[0]["label"] == 1 and val[0]["image"].shape == (12, 16, 1)
    files.png("val/bird/e.png", seed=5)
    with pytest.raises(ValueError, match=r"class folders \['bird'\] are not among"):
        read_image_folder(files.root / "val", class_names=names)


def test_fit_image_converts_channels_and_size():
    grey = np.full((4, 6), 90, dtype=np.uint8)
    assert fit_image(grey, None, 3).shape == (4, 6, 3) and (fit_image(grey, None, 3) == 90).all()
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 255  # pure green: luma 0.587 * 255
    assert fit_image(rgb, 2, 1).shape == (2, 2, 1) and (fit_image(rgb, 2, 1) == 150).all()


@pytest.mark.parametrize("label", ["count", "shape"])
def test_world_images_are_labelled_from_their_scenes(label):
    from mmfactory.world import World
    from mmfactory.world.scenes import SHAPES

    samples = world_labelled_images("val", 6, seed=2, image_size=24, label=label, max_objects=3)
    names, labels = samples.classes, [item["label"] for item in samples.items]
    scenes = [World(seed=2, max_objects=3).scene("val", i) for i in range(6)]
    if label == "count":
        assert names == ["1", "2", "3"]
        assert [y + 1 for y in labels] == [len(s.objects) for s in scenes]
    else:
        assert names == list(SHAPES)
        for y, scene in zip(labels, scenes, strict=True):
            large = [o.shape for o in scene.objects if o.size == "large"]
            assert names[y] == (large or [scene.objects[0].shape])[0]
    assert samples.media(0).shape == (24, 24, 3)
