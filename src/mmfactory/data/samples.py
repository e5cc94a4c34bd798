"""The collection every source reader returns: light fields in memory, media loaded when a sample is drawn.

:class:`ImageConversations` (chat, image-chat) and :class:`~mmfactory.data.image_text.ImageCaptions`
(image-text) are the typed collections of their kinds; :class:`Samples` is the one of the others
(video-text, labelled-image, preference, article). All of them support ``len``, ``+`` (concatenation),
``select`` (indices, repeats allowed) and ``first``, which is what :func:`mmfactory.data.sources.mix`
needs; the lazy accessors stay picklable (``functools.partial`` of module functions) for DataLoader
workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any


def selected(get: Callable, indices: list[int], index: int):
    """Item ``index`` of a selection: ``get(indices[index])`` (picklable, for DataLoader workers)."""
    return get(indices[index])


def concatenated(first: Callable, second: Callable, split: int, index: int):
    """Item ``index`` of two collections joined at ``split`` (picklable)."""
    return first(index) if index < split else second(index - split)


def _no_media(index: int) -> None:
    return None


@dataclass
class Samples:
    """Sample ``i`` is ``items[i]`` (a dict of light fields: captions, label, prompt, ...) and
    ``media(i)`` (its heavy part, loaded on access: a video's frames or file, an image, a list of
    images; None where the kind has none). ``classes`` names the labels of a labelled-image collection.

    The fields per kind are documented at :mod:`mmfactory.data.sources`.
    """

    items: list[dict[str, Any]]
    media: Callable[[int], Any] = _no_media
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __add__(self, other: Samples) -> Samples:
        if self.classes != other.classes:
            raise ValueError(
                f"sources name different classes ({self.classes} and {other.classes}): labelled sources "
                "mixed in one stage must share their class names"
            )
        media = partial(concatenated, self.media, other.media, len(self))
        return Samples(self.items + other.items, media, self.classes)

    def select(self, indices: Sequence[int]) -> Samples:
        indices = list(indices)
        return Samples([self.items[i] for i in indices], partial(selected, self.media, indices), self.classes)

    def first(self, n: int) -> Samples:
        return self if n >= len(self) else self.select(range(n))

    def sample(self, index: int) -> dict[str, Any]:
        """``items[index]`` with its media under ``"media"``."""
        return {**self.items[index], "media": self.media(index)}
