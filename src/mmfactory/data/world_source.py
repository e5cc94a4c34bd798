"""The built-in world as a source (``format: world``): the data layer's one door into :mod:`mmfactory.world`.

Kinds: ``captions``, ``vqa``, ``llava``, ``pope`` (image-chat: one image per conversation, see
:func:`world_conversations`; ``size`` per language, in the order given; POPE
probes are English only), ``chat`` (text-only chats of :func:`mmfactory.world.text.chat_samples`,
optionally filtered by ``chat_kinds``) and ``scenes`` (image-text: scenes ``0..size-1`` of the split, each
captioned in every language x detail level).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from functools import partial

from mmfactory.data.image_text import ImageCaptions
from mmfactory.data.multimodal import IMAGE_TOKEN, ImageConversations
from mmfactory.data.policy import BadSampleCounter
from mmfactory.data.sources import SampleKind, SourceConfig, mix

DEFAULT_SIZE = 2000


def world_captions(scene, languages: Sequence[str], details: Sequence[str]) -> list[str]:
    """The captions of a world scene, every language x detail level in that order."""
    from mmfactory.world.captions import caption

    return [caption(scene, lang, detail) for lang in languages for detail in details]


def world_image_captions(
    split: str,
    n: int,
    seed: int = 0,
    image_size: int = 32,
    languages: Sequence[str] = ("en",),
    details: Sequence[str] = ("brief", "detailed"),
) -> ImageCaptions:
    """Scenes ``0..n-1`` of a world split, each captioned in every language x detail level."""
    from mmfactory.world import World
    from mmfactory.world.scenes import render_scene

    world = World(seed=seed, image_size=image_size)
    scenes = [world.scene(split, i) for i in range(n)]
    images = [render_scene(scene, image_size) for scene in scenes]
    captions = [world_captions(s, languages, details) for s in scenes]
    return ImageCaptions(captions, partial(operator.getitem, images), scenes)


def world_conversations(
    kind: str, split: str, n: int, seed: int = 0, lang: str = "en", image_size: int = 32
) -> ImageConversations:
    """``n`` conversations of one image each from the built-in world.

    ``captions``: brief description requests (LLaVA's stage-1 data); ``vqa``: one short-answer question;
    ``llava``: 1-3 turns mixing a brief or detailed description and questions; ``pope``: yes/no object
    probes, half present, half absent (random, popular and adversarial negatives in turn; English).
    """
    from mmfactory.world import World
    from mmfactory.world.vqa import DESCRIBE

    world = World(seed=seed, image_size=image_size)
    if kind == "captions":
        items = world.pairs(split, n, lang, detail="brief")
        turns = [(DESCRIBE[lang]["brief"], item["text"]) for item in items]
    elif kind == "vqa":
        items = world.vqa(split, n, lang)
        turns = [(item["question"], item["answer"]) for item in items]
    elif kind == "llava":
        items = world.llava(split, n, lang)
    elif kind == "pope":
        from mmfactory.world.vqa import POPE_KINDS

        per_kind = [world.pope(split, -(-n // len(POPE_KINDS)), k) for k in POPE_KINDS]
        items = [probes[i] for i in range(len(per_kind[0])) for probes in per_kind][:n]
        turns = [(item["question"], item["label"]) for item in items]
    else:
        raise ValueError(f"unknown world kind {kind!r}; expected captions, vqa, llava or pope")
    if kind == "llava":  # as read_llava returns them
        messages, images = [item["conversations"] for item in items], [item["images"] for item in items]
    else:
        messages = [
            [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}, {"role": "assistant", "content": a}]
            for q, a in turns
        ]
        images = [[item["image"]] for item in items]
    return ImageConversations(messages, [len(i) for i in images], partial(operator.getitem, images))


def read_world(source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter):
    size = DEFAULT_SIZE if source.size is None else source.size
    if source.kind == "scenes":
        return world_image_captions(
            source.split, size, source.seed, source.image_size, source.languages, source.details
        )
    if source.kind == "chat":
        from mmfactory.world.text import chat_samples

        records = chat_samples(source.split, size, seed=source.seed)
        if source.chat_kinds is not None:  # of the `size` drawn, keep these kinds only
            records = [r for r in records if r["kind"] in source.chat_kinds]
        messages = [r["messages"] for r in records]
        return ImageConversations(
            messages, [0] * len(messages), partial(operator.getitem, [[]] * len(messages))
        )
    parts = [
        world_conversations(source.kind, source.split, size, source.seed, lang, source.image_size)
        for lang in source.languages
    ]
    return mix(parts, [None] * len(parts))
