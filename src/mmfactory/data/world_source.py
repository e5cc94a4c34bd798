"""The built-in world as a source (``format: world``): the data layer's one door into :mod:`mmfactory.world`.

Kinds: ``captions``, ``vqa``, ``existence_pairs``, ``llava``, ``pope`` (image-chat: one image per
conversation, see :func:`world_conversations`; ``size`` per language, in the order given; POPE
probes are English only), ``chat`` (text-only chats of :func:`mmfactory.world.text.chat_samples`,
optionally filtered by ``chat_kinds``), ``scenes`` (image-text: scenes ``0..size-1`` of the split, each
captioned in every language x detail level), ``videos`` (video-text: clips with their captions in every
language), ``labelled`` (labelled-image: scenes of 1..``max_objects`` objects labelled by ``shape`` or
``count``), ``preference`` (image pairs: faithful vs hallucinated descriptions and answers),
``article_preference`` (text pairs: SAG's faithful vs hallucinated notes, languages in turn) and
``articles`` (SAG fact sets, each in every language), ``article_requests`` (the same articles given as a
seller's free-form message: article samples, or chats drafting from the message), the av-chat kinds of
:data:`AV_WORLD_KINDS`
(visual-only ``video_captions`` / ``video_qa``, audio-only ``audio_captions`` / ``audio_qa`` on separate
audio clips, audio-visual ``av_qa`` (reasoning that needs both), ``av_conversations`` and ``av_narratives``:
Audio-Visual LLM's three kinds of video instruction data, English), ``web_pool`` (Filter & Align's noisy
pool of ``size`` pairs, ``bad_fraction`` of them misaligned, as image-text pairs or image-chat caption
requests; ``keep_uids`` keeps a filter's selection). Items ``offset .. offset + size - 1``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from mmfactory.config import ConfigError
from mmfactory.data.benchmarks import AVBenchmark, Benchmarks, ZeroShotBenchmark, format_choice
from mmfactory.data.image_text import ImageCaptions
from mmfactory.data.multimodal import IMAGE_TOKEN, ImageConversations
from mmfactory.data.policy import BadSampleCounter
from mmfactory.data.samples import Samples, mix, selected
from mmfactory.data.source_config import AV_WORLD_KINDS, SampleKind, SourceConfig

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
    probes, half present, half absent (random, popular and adversarial negatives in turn; English);
    ``existence_pairs``: existence questions in pairs on one image, a present object then a near miss;
    ``yesno_pairs``: MME-style yes/no pairs (existence, count, position, colour; English); ``choice``:
    MMBench-style four-option questions answered by letter, the options in a random rotation (English).
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
    elif kind == "existence_pairs":
        items = world.existence_pairs(split, n, lang)
        turns = [(item["question"], item["answer"]) for item in items]
    elif kind == "yesno_pairs":
        items = world.yes_no_pairs(split, n)
        turns = [(item["question"], item["answer"]) for item in items]
    elif kind == "choice":
        from mmfactory.world.rng import item_rng

        items = world.choices(split, n)
        turns = [
            format_choice(item, int(item_rng(seed, "choice-shift", split, i).integers(len(item["options"]))))
            for i, item in enumerate(items)
        ]
    elif kind == "pope":
        from mmfactory.world.vqa import POPE_KINDS

        per_kind = [world.pope(split, -(-n // len(POPE_KINDS)), k) for k in POPE_KINDS]
        items = [probes[i] for i in range(len(per_kind[0])) for probes in per_kind][:n]
        turns = [(item["question"], item["label"]) for item in items]
    else:
        raise ValueError(
            f"unknown world kind {kind!r}; expected captions, vqa, existence_pairs, yesno_pairs, choice, "
            "llava or pope"
        )
    if kind == "llava":  # as read_llava returns them
        messages, images = [item["conversations"] for item in items], [item["images"] for item in items]
    else:
        messages = [
            [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q}"}, {"role": "assistant", "content": a}]
            for q, a in turns
        ]
        images = [[item["image"]] for item in items]
    return ImageConversations(messages, [len(i) for i in images], partial(operator.getitem, images))


CAPTION_KEYS = {"en": "captions", "zh": "captions_zh"}  # of a world video


def world_videos(split: str, n: int, seed: int, frame_size: int, languages: Sequence[str]) -> Samples:
    """Clips ``0..n-1`` of a world split with their captions in every language (in that order)."""
    from mmfactory.world import World

    videos = World(seed=seed, video_size=frame_size).videos(split, n)
    items = [
        {"video_id": v["video_id"], "captions": [c for lang in languages for c in v[CAPTION_KEYS[lang]]]}
        for v in videos
    ]
    return Samples(items, partial(operator.getitem, [v["video"] for v in videos]))


PLACEHOLDERS = {"video": "<video>\n", "audio": "<audio>\n", "audio-visual": "<video>\n<audio>\n"}


def world_av_media(seed: int, frame_size: int, split: str, streams: str, index: int) -> dict:
    """The media of item ``index``: a clip's frames and / or its audio track, or an audio-only clip."""
    from mmfactory.world import SAMPLE_RATE, World
    from mmfactory.world.audio import audio_clip
    from mmfactory.world.video import clip_at, clip_audio, render_clip

    if streams == "audio":
        clip = audio_clip(seed, split, index)
        return {"video": None, "audio": clip["audio"], "sample_rate": clip["sample_rate"]}
    world = World(seed=seed, video_size=frame_size)
    clip = clip_at(seed, split, index, world.video_frames, world.max_video_objects)
    # only the streams the sample carries are rendered (synthesising the audio costs more than the frames)
    audio = clip_audio(clip, world.fps) if streams == "audio-visual" else None
    return {"video": render_clip(clip, frame_size), "audio": audio, "sample_rate": SAMPLE_RATE}


def av_messages(turns: list[tuple[str, str]], streams: str) -> list[dict[str, str]]:
    """Turns as messages, the stream placeholders opening the first user turn."""
    messages = []
    for k, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": (PLACEHOLDERS[streams] if k == 0 else "") + question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def world_av_turns(kind: str, split: str, n: int, seed: int) -> list[list[tuple[str, str]]]:
    """The question-answer turns of items ``0..n-1`` of an av-chat world kind (no media rendered)."""
    from mmfactory.world import World
    from mmfactory.world.audio import audio_caption, audio_question, sounds_at
    from mmfactory.world.rng import item_rng
    from mmfactory.world.video import (
        DESCRIBE_SOUND,
        DESCRIBE_VIDEO,
        av_instruction,
        av_question,
        clip_at,
        clip_captions,
        video_question,
    )

    if AV_WORLD_KINDS[kind] == "audio":
        sounds = [sounds_at(seed, split, i) for i in range(n)]
        if kind == "audio_captions":
            return [[(DESCRIBE_SOUND, audio_caption(s))] for s in sounds]
        qas = [audio_question(s, item_rng(seed, "audio-qa", split, i)) for i, s in enumerate(sounds)]
        return [[(qa["question"], qa["answer"])] for qa in qas]
    world = World(seed=seed)
    clips = [clip_at(seed, split, i, world.video_frames, world.max_video_objects) for i in range(n)]
    if kind == "video_captions":
        return [[(DESCRIBE_VIDEO, clip_captions(c)[0])] for c in clips]
    if kind in ("video_qa", "av_qa"):  # as World.video_qa / World.av_qa ask them (None: none fits the clip)
        ask, stream = (video_question, "vqa-video") if kind == "video_qa" else (av_question, "av-qa")
        qas = [ask(c, item_rng(seed, stream, split, i)) for i, c in enumerate(clips)]
        return [[] if qa is None else [(qa["question"], qa["answer"])] for qa in qas]
    instruction = {"av_conversations": "conversation", "av_narratives": "narrative"}[kind]
    return [
        av_instruction(c, world.fps, item_rng(seed, "av-instruct", instruction, split, i), instruction)
        for i, c in enumerate(clips)
    ]


def world_av_conversations(kind: str, split: str, n: int, seed: int, frame_size: int) -> Samples:
    """The av-chat samples of items ``0..n-1`` of a world kind (:data:`AV_WORLD_KINDS`; ``av_qa`` leaves
    out the clips no audio-visual question fits); media rendered when drawn."""
    streams = AV_WORLD_KINDS[kind]
    turns = world_av_turns(kind, split, n, seed)
    kept = [i for i, t in enumerate(turns) if t]  # av_qa: clips no audio-visual question fits are left out
    items = [
        {
            "id": f"{kind}-{split}-{i:06d}",
            "messages": av_messages(turns[i], streams),
            "where": f"world:{kind}",
        }
        for i in kept
    ]
    media = partial(selected, partial(world_av_media, seed, frame_size, split, streams), kept)
    return Samples(items, media)


def world_labelled_images(
    split: str, n: int, seed: int, image_size: int, label: str, max_objects: int | None
) -> Samples:
    """Scenes ``0..n-1`` labelled by the ``shape`` of their largest object (the first in reading order
    among equals) or their object ``count`` (class ``k - 1`` for ``k`` objects)."""
    from mmfactory.world import World
    from mmfactory.world.scenes import RADIUS, SHAPES, render_scene

    world = World(seed=seed) if max_objects is None else World(seed=seed, max_objects=max_objects)
    scenes = [world.scene(split, i) for i in range(n)]
    if label == "shape":
        classes = list(SHAPES)
        labels = [SHAPES.index(max(s.objects, key=lambda o: RADIUS[o.size]).shape) for s in scenes]
    else:
        classes = [str(k) for k in range(1, world.max_objects + 1)]
        labels = [len(s.objects) - 1 for s in scenes]
    images = [render_scene(s, image_size) for s in scenes]
    return Samples([{"label": y} for y in labels], partial(operator.getitem, images), classes)


def world_preference(kind: str, split: str, n: int, seed: int, image_size: int, languages) -> Samples:
    """``preference``: image pairs (:meth:`mmfactory.world.World.preference`); ``article_preference``: SAG
    notes for a draft, pair ``i`` in ``languages[i % len(languages)]``."""
    from mmfactory.world import World

    if kind == "preference":
        pairs = World(seed=seed, image_size=image_size).preference(split, n, source="image")
        images = [[p.pop("image")] for p in pairs]
        return Samples(pairs, partial(operator.getitem, images))
    from mmfactory.world.articles import article_preference

    pairs = [article_preference(seed, split, i, languages[i % len(languages)]) for i in range(n)]
    return Samples(pairs, partial(operator.getitem, [[]] * n))


def world_rankings(split: str, n: int, seed: int, image_size: int) -> Samples:
    """Scenes ``0..n-1`` with every caption kind graded and ranked (rank 1 best, equal quality tied)."""
    from mmfactory.world import World

    rankings = World(seed=seed, image_size=image_size).rankings(split, n)
    items = [{key: r[key] for key in ("id", "captions", "ranks", "kinds")} for r in rankings]
    return Samples(items, partial(operator.getitem, [r["image"] for r in rankings]))


def world_articles(split: str, n: int, seed: int, languages: Sequence[str], offset: int = 0) -> Samples:
    """Articles ``offset .. offset + n - 1`` of a split, each in every language (language innermost)."""
    from mmfactory.world.articles import article

    return Samples([article(seed, split, i, lang) for i in range(offset, offset + n) for lang in languages])


def world_article_requests(
    kind: SampleKind, split: str, n: int, seed: int, languages: Sequence[str], offset: int = 0
) -> Samples | ImageConversations:
    """Articles ``offset .. offset + n - 1`` whose ``input`` is a seller's free-form message of their facts
    (:func:`mmfactory.world.articles.request_article`): as ``article`` samples (a NoteBench split whose
    input is not the fact list), or as ``chat`` samples, the message under the drafting instruction
    answered by the neutral draft (the frozen LLM's instruction tuning)."""
    from mmfactory.world.articles import request_article
    from mmfactory.world.text import INSTRUCTIONS

    articles = [
        request_article(seed, split, i, lang) for i in range(offset, offset + n) for lang in languages
    ]
    if kind == "article":
        return Samples(articles)
    messages = [
        [
            {"role": "user", "content": INSTRUCTIONS[a["lang"]]["facts_to_draft"] + a["input"]},
            {"role": "assistant", "content": a["draft"]},
        ]
        for a in articles
    ]
    return ImageConversations(messages, [0] * len(messages), partial(operator.getitem, [[]] * len(messages)))


def read_uid_list(path: str | Path) -> set[str]:
    """The uids of a uid file (one per line, as ``mmfactory filter select`` and DataComp write them)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"keep_uids: {str(path)!r} does not exist")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def world_pool_samples(
    n: int, bad_fraction: float, image_size: int, keep_uids: str | None, kind: SampleKind, counts: Counter
) -> ImageCaptions | ImageConversations:
    """The world's web pool (:func:`world_web_pool`) as ``image-text`` pairs or as ``image-chat`` brief-
    caption requests answered by the pool's text; with ``keep_uids``, only the pairs that file lists (a
    filter's selection), in pool order. ``counts``: ``web_pool_kept`` and ``web_pool_misaligned`` (kept pairs
    that the world's hidden truth calls misaligned)."""
    pool = world_web_pool(n, bad_fraction, image_size)
    if keep_uids is not None:
        wanted = read_uid_list(keep_uids)
        pool = [pair for pair in pool if pair["uid"] in wanted]
        if len(pool) != len(wanted):
            raise ConfigError(
                f"keep_uids: {keep_uids} lists {len(wanted) - len(pool)} uids that are not in the world's "
                f"pool of {n} (was it selected from another pool?)"
            )
    counts.update(web_pool_kept=len(pool), web_pool_misaligned=sum(not p["aligned"] for p in pool))
    images = [pair["image"] for pair in pool]
    if kind == "image-text":
        return ImageCaptions([[pair["text"]] for pair in pool], partial(operator.getitem, images))
    from mmfactory.world.vqa import DESCRIBE

    messages = [
        [
            {"role": "user", "content": f"{IMAGE_TOKEN}\n{DESCRIBE['en']['brief']}"},
            {"role": "assistant", "content": pair["text"]},
        ]
        for pair in pool
    ]
    return ImageConversations(messages, [1] * len(pool), partial(operator.getitem, [[i] for i in images]))


def read_world(source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter):
    size = DEFAULT_SIZE if source.size is None else source.size
    if source.kind == "web_pool":
        return world_pool_samples(
            size, source.bad_fraction, source.image_size, source.keep_uids, kind, counts
        )
    if source.kind == "videos":
        return world_videos(source.split, size, source.seed, source.image_size, source.world_languages)
    if source.kind in AV_WORLD_KINDS:
        return world_av_conversations(source.kind, source.split, size, source.seed, source.image_size)
    if source.kind == "labelled":
        return world_labelled_images(
            source.split, size, source.seed, source.image_size, source.label, source.max_objects
        )
    if source.kind in ("preference", "article_preference"):
        return world_preference(
            source.kind, source.split, size, source.seed, source.image_size, source.world_languages
        )
    if source.kind == "rankings":
        return world_rankings(source.split, size, source.seed, source.image_size)
    if source.kind == "articles":
        return world_articles(source.split, size, source.seed, source.world_languages, source.offset)
    if source.kind == "article_requests":
        return world_article_requests(
            kind, source.split, size, source.seed, source.world_languages, source.offset
        )
    if source.kind == "scenes":
        return world_image_captions(
            source.split, size, source.seed, source.image_size, source.world_languages, source.details
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
        for lang in source.world_languages
    ]
    return mix(parts, [None] * len(parts))


def world_claims(text: str, lang: str) -> dict[str, str]:
    """The product facts (attribute -> value) a text states, read with the world's product vocabulary
    (:func:`mmfactory.world.articles.extract_claims`; NoteBench's claim extractor for world articles)."""
    from mmfactory.world.articles import extract_claims

    return extract_claims(text, lang)


def world_object_mentions(text: str) -> list[str]:
    """The world objects (``"red star"``) an English text names, in order, repeats kept
    (:func:`mmfactory.world.captions.object_mentions`): the object vocabulary of CHAIR and of the
    on-policy judge on world data."""
    from mmfactory.world.captions import object_mentions

    return object_mentions(text)


def world_benchmarks(
    vqa: int,
    pope: int,
    captions: int,
    seed: int = 0,
    split: str = "test",
    image_size: int = 32,
    caption_details: Sequence[str] = ("brief",),
    mme: int = 0,
    mmbench: int = 0,
):
    """Held-out :class:`~mmfactory.eval.mllm.Benchmarks` from the built-in world (English): ``vqa``
    questions, ``pope`` probes per POPE split (random, popular, adversarial; half yes) and ``captions``
    images with their captions of each of ``caption_details`` as references and the objects of the first,
    asked as training asks for brief captions and scored for object hallucination with the world's object
    vocabulary; ``mme`` MME-style yes/no questions (in pairs) and ``mmbench`` four-option questions."""

    from mmfactory.world import World
    from mmfactory.world.vqa import DESCRIBE, POPE_KINDS

    world = World(seed=seed, image_size=image_size)
    per_detail = [world.pairs(split, captions, detail=d) if captions else [] for d in caption_details]
    return Benchmarks(
        vqa=world.vqa(split, vqa) if vqa else [],
        pope={kind: world.pope(split, pope, kind) for kind in POPE_KINDS} if pope else {},
        mme=world.yes_no_pairs(split, mme) if mme else [],
        mmbench=world.choices(split, mmbench) if mmbench else [],
        captions=[
            {
                "image": pairs[0]["image"],
                "references": [p["text"] for p in pairs],
                "objects": world_object_mentions(pairs[0]["text"]),
            }
            for pairs in zip(*per_detail, strict=True)
        ],
        caption_prompt=DESCRIBE["en"]["brief"],
        mentions=world_object_mentions,
    )


def world_tokenizer():
    """The built-in byte-level BPE tokenizer trained on the world's text (cached on disk)."""
    from mmfactory.world.tokenizer import world_tokenizer as tokenizer

    return tokenizer()


def shape_twin(scene, rng: np.random.Generator):
    """``scene`` with every object's shape redrawn uniformly among the others, colour, size, position and
    background kept; the objects' (shape, colour) pairs stay distinct and outside ``HELD_OUT``, as in
    every scene the world samples."""
    from mmfactory.world.scenes import HELD_OUT, SHAPES, Scene

    objects = []
    for obj in scene.objects:
        taken = {(o.shape, o.color) for o in objects} | HELD_OUT
        choices = [s for s in SHAPES if s != obj.shape and (s, obj.color) not in taken]
        objects.append(dataclasses.replace(obj, shape=choices[rng.integers(len(choices))]))
    return Scene(tuple(objects), scene.background)


def world_shape_twin(
    scene,
    rng: np.random.Generator,
    languages: Sequence[str],
    details: Sequence[str],
    caption_index: int,
    size: int,
) -> dict:
    """A hard negative for ``scene`` (:func:`shape_twin`): ``{"image": uint8 [size, size, 3], "caption",
    "scene"}``, captioned like the original (``world_captions(...)[caption_index]``)."""
    from mmfactory.world.scenes import render_scene

    twin = shape_twin(scene, rng)
    caption = world_captions(twin, languages, details)[caption_index]
    return {"image": render_scene(twin, size), "caption": caption, "scene": twin}


def zero_shot_prompts(attribute: str, lang: str) -> dict[str, list[str]]:
    """Class -> prompts: the world's brief captions of one object of that shape in every colour (or of that
    colour on every shape), leaving out the held-out compositional pairs."""
    from mmfactory.world.captions import brief_caption
    from mmfactory.world.scenes import COLORS, HELD_OUT, SHAPES, Scene, SceneObject

    prompts: dict[str, list[str]] = {}
    for shape in SHAPES:
        for color in COLORS:
            if (shape, color) not in HELD_OUT:
                text = brief_caption(Scene((SceneObject(shape, color, "small", 0.5, 0.5),), "black"), lang)
                prompts.setdefault(shape if attribute == "shape" else color, []).append(text)
    return prompts


def world_zero_shot(size: int, seed: int, image_size: int, languages: Sequence[str]) -> list:
    """Zero-shot shape and colour classification (:class:`~mmfactory.eval.zero_shot.ZeroShotBenchmark`,
    named ``zeroshot_{lang}_{shape|color}``) of ``size`` single-object scenes of the world's test split."""

    from mmfactory.world.scenes import render_scene, scene_at

    scenes = [scene_at(seed, "test", i, max_objects=1) for i in range(size)]
    images = [render_scene(scene, image_size) for scene in scenes]
    benchmarks = []
    for lang in languages:
        for attribute in ("shape", "color"):
            prompts = zero_shot_prompts(attribute, lang)
            classes = list(prompts)
            labels = [classes.index(getattr(s.objects[0], attribute)) for s in scenes]
            name = f"zeroshot_{lang}_{attribute}"
            benchmarks.append(ZeroShotBenchmark(name, images, labels, classes, [prompts[c] for c in classes]))
    return benchmarks


def world_web_pool(n: int, bad_fraction: float, image_size: int = 32) -> list[dict]:
    """The world's web-like pool: ``n`` pairs ``{"uid", "image", "text", "aligned", "kind"}`` of which
    exactly ``round(n * bad_fraction)`` are misaligned or low quality (the hidden truth a filter is
    measured against)."""
    from mmfactory.world import World

    pairs, truth = World(image_size=image_size).web_pool(n, bad_fraction)
    return [{**pair, **{k: t[k] for k in ("aligned", "kind")}} for pair, t in zip(pairs, truth, strict=True)]


def world_scene_layout(scenes) -> tuple[np.ndarray, np.ndarray]:
    """World scenes as grid layouts for a cell-wise judge: ``cells`` int64 ``[N, 9, 2]`` (per cell of the
    3x3 grid in raster order: shape index + 1, colour index + 1; 0 = empty) and ``background`` ``[N]``."""
    from mmfactory.world.scenes import BACKGROUNDS, COLORS, POSITIONS, SHAPES

    cell_of = {name: 3 * row + col for row, names in enumerate(POSITIONS) for col, name in enumerate(names)}
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    cells = np.zeros((len(scenes), 9, 2), dtype=np.int64)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            cells[i, cell_of[obj.position]] = (SHAPES.index(obj.shape) + 1, colors.index(obj.color) + 1)
    return cells, np.array([backgrounds.index(s.background) for s in scenes], dtype=np.int64)


def world_scene_vocabulary() -> dict[str, int]:
    """Sizes of the world's layout vocabulary: ``grid`` side, ``num_shapes``, ``num_colors`` and
    ``num_backgrounds``."""
    from mmfactory.world.scenes import BACKGROUNDS, COLORS, SHAPES

    sizes = {"num_shapes": len(SHAPES), "num_colors": len(COLORS), "num_backgrounds": len(BACKGROUNDS)}
    return {"grid": 3, **sizes}


def world_av_benchmarks(
    sizes: dict[str, int],
    streams: Sequence[str],
    seed: int = 0,
    split: str = "test",
    frame_size: int = 32,
    single_stream_probes: bool = True,
) -> list:
    """Held-out :class:`~mmfactory.eval.av.AVBenchmark` s from the built-in world: ``video_qa``,
    ``audio_qa``, ``av_qa`` (needs both streams), ``av_which`` (zero-shot: a question kind no training
    data asks), ``audio_captions`` and ``video_captions``, ``sizes[name]`` items each (0 or absent: left
    out). Each is asked with the streams it needs that ``streams`` (those the model knows) include; one
    that needs none of them is left out. With ``single_stream_probes`` and a model that knows both streams,
    ``av_qa`` and ``av_which`` are also asked with each stream alone (``av_qa_video_alone``,
    ``av_qa_audio_alone``, ...): how much the answers need both."""

    from mmfactory.world import World
    from mmfactory.world.video import DESCRIBE_SOUND, DESCRIBE_VIDEO

    world = World(seed=seed, video_size=frame_size)
    needs = {
        "video_qa": ("video",),
        "audio_qa": ("audio",),
        "av_qa": ("video", "audio"),
        "av_which": ("video", "audio"),
        "audio_captions": ("audio",),
        "video_captions": ("video",),
    }
    unknown = set(sizes) - set(needs)
    if unknown:
        raise ConfigError(f"unknown audio-visual benchmarks {sorted(unknown)}; expected {sorted(needs)}")
    make = {
        "video_qa": lambda n: (world.video_qa(split, n), None),
        "audio_qa": lambda n: (world.audio_qa(split, n), None),
        "av_qa": lambda n: (world.av_qa(split, n), None),
        "av_which": lambda n: (world.av_which(split, n), None),
        "audio_captions": lambda n: (
            [{**c, "references": [c["caption"]]} for c in world.audio_clips(split, n)],
            DESCRIBE_SOUND,
        ),
        "video_captions": lambda n: (
            [{**v, "references": v["captions"][:1]} for v in world.videos(split, n)],
            DESCRIBE_VIDEO,
        ),
    }
    benchmarks = []
    for name, n in sizes.items():
        asked = tuple(s for s in needs[name] if s in streams)
        if n and asked:
            items, prompt = make[name](n)
            benchmarks.append(AVBenchmark(name, items, asked, prompt))
            if single_stream_probes and len(asked) == 2:
                benchmarks += [AVBenchmark(f"{name}_{s}_alone", items, (s,), prompt) for s in asked]
    return benchmarks
