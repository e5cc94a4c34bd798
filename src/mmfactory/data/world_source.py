"""The built-in world as a source (``format: world``): the data layer's one door into :mod:`mmfactory.world`.

Kinds: ``captions``, ``vqa``, ``llava``, ``pope`` (image-chat: one image per conversation, see
:func:`mmfactory.data.multimodal.world_conversations`) and ``chat`` (text-only chats of
:func:`mmfactory.world.text.chat_samples`, optionally filtered by ``chat_kinds``). ``size`` samples per
language, languages in the order given (POPE probes are English only).
"""

from __future__ import annotations

import operator
from collections import Counter
from functools import partial

from mmfactory.config import ConfigError
from mmfactory.data.multimodal import ImageConversations, world_conversations
from mmfactory.data.policy import BadSampleCounter
from mmfactory.data.sources import SampleKind, SourceConfig, mix

IMAGE_KINDS = ("captions", "vqa", "llava", "pope")
DEFAULT_SIZE = 2000


def read_world(
    source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter
) -> ImageConversations:
    size = DEFAULT_SIZE if source.size is None else source.size
    if source.kind == "chat":
        from mmfactory.world.text import chat_samples

        if source.languages != ["en"]:
            raise ConfigError("languages: the world's text chats are English only")
        records = chat_samples(source.split, size, seed=source.seed)
        if source.chat_kinds is not None:  # of the `size` drawn, keep these kinds only
            records = [r for r in records if r["kind"] in source.chat_kinds]
        messages = [r["messages"] for r in records]
        return ImageConversations(
            messages, [0] * len(messages), partial(operator.getitem, [[]] * len(messages))
        )
    if source.kind not in IMAGE_KINDS:
        raise ConfigError(f"kind: unknown world kind {source.kind!r} (kinds: {', '.join(IMAGE_KINDS)}, chat)")
    if kind == "chat":
        raise ConfigError(
            f"kind: world kind {source.kind!r} has images; a text-only chat task reads kind: chat"
        )
    if source.kind == "pope" and source.languages != ["en"]:
        raise ConfigError("languages: the world's POPE probes are English only")
    parts = [
        world_conversations(source.kind, source.split, size, source.seed, lang, source.image_size)
        for lang in source.languages
    ]
    return mix(parts, [None] * len(parts))
