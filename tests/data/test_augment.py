"""Image augmentation: the crop box follows RandomResizedCrop's sampling, flips and erasing do what they
say, and a sample's augmentation replays under the same torch seed (what exact resume needs)."""

import numpy as np
import pytest
import torch

from mmfactory.config import ConfigError
from mmfactory.data.augment import AugmentedImages, ImageAugment, augment_image, random_box


def test_random_box_area_and_aspect_stay_in_range():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = random_box(32, 32, (0.2, 1.0), (3 / 4, 4 / 3), generator)
        assert 0 <= top <= 32 - h and 0 <= left <= 32 - w
        assert 0.2 * 1024 * 0.8 <= h * w <= 1024  # rounding of a few pixels aside
    assert random_box(8, 8, (0.99, 1.0), (3.0, 4.0), generator, fallback=False) is None
    assert random_box(8, 8, (0.99, 1.0), (3.0, 4.0), generator) == (2, 0, 3, 8)  # central, ratio clamped to 3


def test_flip_crop_and_erase():
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    generator = torch.Generator().manual_seed(0)
    flips = [augment_image(image, ImageAugment(flip=True), generator) for _ in range(40)]
    assert all(np.array_equal(f, image) or np.array_equal(f, image[:, ::-1]) for f in flips)
    assert 5 < sum(np.array_equal(f, image) for f in flips) < 35
    whole = augment_image(image, ImageAugment(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0]), generator)
    assert np.array_equal(whole, image)  # the whole image, resized to itself
    cropped = augment_image(image, ImageAugment(crop_scale=[0.2, 0.3]), generator)
    assert cropped.shape == image.shape and not np.array_equal(cropped, image)
    erased = [augment_image(image, ImageAugment(erase_prob=1.0), generator) for _ in range(20)]
    changed = [(e != image).any(-1).sum() for e in erased]
    assert all(0 < c <= 64 / 3 + 4 for c in changed if c) and sum(c > 0 for c in changed) > 10


def test_augmented_samples_replay_under_the_same_seed():
    data = [
        {"image": np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i}
        for i in range(4)
    ]
    augmented = AugmentedImages(data, ImageAugment(crop_scale=[0.3, 1.0], flip=True, erase_prob=0.5))
    torch.manual_seed(3)
    first = [augmented[i]["image"] for i in range(4)]
    torch.manual_seed(3)
    again = [augmented[i] for i in range(4)]
    assert all(np.array_equal(a["image"], b) for a, b in zip(again, first, strict=True))
    assert [a["label"] for a in again] == [0, 1, 2, 3] and not np.array_equal(first[0], data[0]["image"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"crop_scale": [0.0, 1.0]}, "crop_scale"),
        ({"crop_ratio": [2.0, 1.0]}, "crop_ratio"),
        ({"erase_prob": 1.5}, "erase_prob"),
    ],
)
def test_out_of_range_settings_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        ImageAugment(**fields).validate()
