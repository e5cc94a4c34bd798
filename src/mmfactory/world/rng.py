"""Per-item random generators: every world item is a pure function of (seed, stream, split, index)."""

import zlib

import numpy as np

IMAGE_SPLITS = ("train", "val", "test", "test_compositional")
SPLITS = ("train", "val", "test")


def _key(part: str | int) -> int:
    return part if isinstance(part, int) else zlib.crc32(part.encode())


def item_rng(seed: int, *parts: str | int) -> np.random.Generator:
    """A generator seeded from ``seed`` and a path of names/indices, e.g. ``("scene", "train", 7)``.

    Items are independent of how many are drawn and of the order they are drawn in.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, *(_key(p) for p in parts)]))


def check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {allowed}")
