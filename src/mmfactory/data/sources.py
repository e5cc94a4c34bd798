"""The data-source layer: a stage's ``data.train`` / ``data.eval`` list *sources*; one table maps formats
to readers; a task asks for the *sample kind* it consumes, never for a file syntax.

A source is ``{format, path, split, image_root, columns, weight, limit, on_bad_sample, ...}``
(:class:`SourceConfig`). Every format in :data:`FORMATS` declares the kinds it yields; a task consuming a
kind accepts any source yielding it, and several sources of one stage are mixed (:func:`mix`)::

    data:
      train:
        - {format: world, kind: llava, size: 2000}
        - {format: llava, path: /data/llava_v1_5_mix665k.json, image_root: /data/images, weight: 3}
        - {format: sharegpt, path: /data/sharegpt.jsonl, limit: 50000}

Sample kinds and what a reader returns for them:

* ``chat``: :class:`~mmfactory.data.multimodal.ImageConversations` with no images.
* ``image-chat``: :class:`~mmfactory.data.multimodal.ImageConversations` — the conversations (with one
  ``<image>`` per image) up front, images decoded lazily when a sample is drawn, so a large annotation
  file costs one parse before step 1, not one decode per image (the existence of every media file is
  checked at read time; a file that fails to decode later raises naming file and record).
* ``image-text``: :class:`~mmfactory.data.image_text.ImageCaptions` — images with their captions.
* The other kinds: :class:`~mmfactory.data.samples.Samples` — light fields in ``items``, the heavy part
  from ``media(i)`` when a sample is drawn:

  - ``video-text``: ``{"video_id", "captions"}``; media: the video (frames or file,
    :func:`mmfactory.data.video_text.video_clip` decodes it); any ``image-text`` source is read as
    ``video-text`` too, each image a 1-frame clip (:data:`CONVERSIONS`: a video-text task is omnivorous);
  - ``labelled-image``: ``{"label": int}`` (``classes`` names them); media: uint8 ``[H, W]`` or
    ``[H, W, C]`` as stored (the task fits size and channels);
  - ``preference``: ``{"id", "prompt", "chosen", "rejected"}`` (paired) or ``{"id", "prompt",
    "completion", "label": bool}`` (TRL's unpaired KTO rows); media: the list of images (0 or 1);
  - ``article``: ``{"id", "lang", "facts", "draft", "reference"}`` (SAG; world articles also carry
    ``"variants"``); no media;
  - ``av-chat``: ``{"id", "messages", "where"}`` (``<video>`` / ``<audio>`` placeholders in the first
    user turn; ``where`` names the file for messages); media: ``{"video", "audio", "sample_rate"}``
    (:mod:`mmfactory.data.av`; files: :mod:`mmfactory.data.readers.av_formats`);
  - ``ranking``: ``{"id", "captions", "ranks"}`` (rank 1 best, ties allowed; world rankings also carry
    ``"kinds"``); media: the image.

Bad records go through ``on_bad_sample`` (:mod:`mmfactory.data.policy`): an error naming file and record,
or a counted skip; :func:`read_sources` prints the skip report (up to 5 examples each) as soon as a source
is read, before anything can fail later, and stops the run when ``max_bad_fraction`` is exceeded.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmfactory.config import ConfigError
from mmfactory.data.multimodal import ImageConversations
from mmfactory.data.policy import BadSampleCounter, BadSampleError, DataError

SampleKind = Literal[
    "chat",
    "image-chat",
    "image-text",
    "video-text",
    "audio-text",
    "av-chat",
    "preference",
    "labelled-image",
    "ranking",
    "article",
]
MissingImageToken = Literal["prepend", "skip", "error"]
MAX_EXAMPLES = 5


@dataclass
class SourceConfig:
    """One source of samples. Which keys a format reads is in :data:`FORMATS` (and docs/formats.md).

    ``path``: a file (relative media paths resolve against ``image_root``, else the file's folder);
    ``dataset`` (format ``hf``): a Hugging Face hub id (cached, ``HF_HUB_OFFLINE`` honoured) or a
    ``save_to_disk`` folder, ``name`` its configuration;
    ``split``: the split to read (the world's: train, val, test, test_compositional); ``columns`` renames the
    file's columns to the fields the format expects (``{messages: conversation}``); ``weight``: the
    source's share of the stage's mixture (unset on every source: plain concatenation); ``limit``: keep
    the first N samples (``subset: random``: N drawn at random with ``seed``, kept in file order).
    ``video_root`` (csv, msrvtt_qa, avsd): the folder of the videos (default: ``videos/`` beside the file);
    ``audio_root`` (audiocaps): the folder of the clips (default: ``clips/`` beside the file);
    ``labels`` (idx): the labels file; ``check_media`` (folder, msrvtt_qa, audiocaps, avsd): decode every
    image / every sample's media once when read.
    World only: ``kind``, ``size``, ``seed``, ``offset`` (the first item's index), ``languages``,
    ``image_size`` (pixels of images and video frames), ``chat_kinds`` (of the ``size`` chats drawn, keep
    these kinds), ``details`` (caption levels of ``kind: scenes``, every language x detail per image),
    ``label`` and ``max_objects`` (``kind: labelled``: scenes of 1..max_objects objects labelled by the
    ``shape`` of the largest or their ``count``), ``bad_fraction`` and ``keep_uids`` (``kind: web_pool``: the
    pool's misaligned share; a uid file, or the name of an earlier ``pool_filter`` stage, whose pairs alone
    are kept). ``languages`` also filters ``format: articles``.
    """

    format: str
    path: str | None = None
    dataset: str | None = None  # hf: a hub id or a save_to_disk folder
    name: str | None = None  # hf: the dataset's configuration
    split: str = "train"
    kind: str | None = None
    image_root: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    weight: float | None = None
    limit: int | None = None
    subset: Literal["first", "random"] = "first"
    on_bad_sample: Literal["error", "skip"] = "error"
    missing_image_token: MissingImageToken = "prepend"  # llava: a row with an image but no <image>
    streaming: bool = False  # webdataset: read shard by shard while training (mmfactory.data.streaming)
    shuffle_buffer: int = 1000  # streaming: samples held for shuffling (0: shard order)
    num_samples: int | None = None  # streaming: the source's size, for epochs (a stream cannot count it)
    video_root: str | None = None
    audio_root: str | None = None  # audiocaps: the folder of the clips (default: clips/ beside the file)
    labels: str | None = None
    check_media: bool = False
    size: int | None = None
    seed: int = 0
    offset: int = 0
    languages: list[Literal["en", "zh"]] | None = None  # world: unset is English; articles: every one
    image_size: int = 32
    chat_kinds: list[str] | None = None
    details: list[Literal["brief", "detailed"]] = field(default_factory=lambda: ["brief", "detailed"])
    label: Literal["shape", "count"] = "count"
    max_objects: int | None = None
    bad_fraction: float = 0.5  # world web_pool: the share of misaligned pairs
    keep_uids: str | None = None  # world web_pool: a uid file (or an earlier pool_filter stage) to keep

    def validate(self) -> None:
        if self.format not in FORMATS:
            close = difflib.get_close_matches(self.format, list(FORMATS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (formats: {', '.join(FORMATS)})"
            raise ConfigError(f"format: unknown format {self.format!r}{hint}")
        spec = FORMATS[self.format]
        defaults = SourceConfig(format=self.format)
        for f in dataclasses.fields(self):
            unused = f.name not in spec.keys and f.name not in COMMON_KEYS
            if unused and getattr(self, f.name) != getattr(defaults, f.name):
                raise ConfigError(
                    f"{f.name}: not read by format {self.format!r} (it reads: "
                    f"{', '.join(sorted(spec.keys | COMMON_KEYS))})"
                )
        if spec.needs_path and self.path is None:
            raise ConfigError(f"path: format {self.format!r} needs a path")
        if self.format == "idx" and self.labels is None:
            raise ConfigError("labels: format 'idx' needs the labels file beside the images file")
        if self.format == "hf" and (self.path is None) == (self.dataset is None):
            raise ConfigError(
                "dataset: format 'hf' reads a dataset (hub id or saved folder) or a path, one of them"
            )
        if self.format == "world" and self.kind not in WORLD_KINDS:
            close = difflib.get_close_matches(str(self.kind), WORLD_KINDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else ", ".join(WORLD_KINDS)
            what = "needs a kind" if self.kind is None else f"has no kind {self.kind!r}"
            raise ConfigError(f"kind: format 'world' {what} ({hint})")
        if self.format == "world" and self.kind in ENGLISH_ONLY and self.languages not in (None, ["en"]):
            raise ConfigError(f"languages: the world's {self.kind} samples are English only")
        if self.format == "world" and self.offset and self.kind not in ("articles", "article_requests"):
            raise ConfigError(f"offset: only the world's articles start at an offset, not its {self.kind}")
        if self.weight is not None and not self.weight > 0:
            raise ConfigError(f"weight: must be > 0, got {self.weight}")
        for name, least in (("limit", 1), ("size", 0), ("image_size", 1), ("offset", 0), ("max_objects", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"{name}: must be >= {least}, got {value}")
        if self.streaming and (self.limit is not None or self.weight is not None):
            raise ConfigError(
                "streaming: a streaming source is read as it comes; limit and weight do not apply"
            )
        for name in ("shuffle_buffer", "num_samples"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        if self.subset == "random" and self.limit is None:
            raise ConfigError("subset: random draws `limit` samples; set limit")
        if not 0.0 <= self.bad_fraction <= 1.0:
            raise ConfigError(f"bad_fraction: must be in [0, 1], got {self.bad_fraction}")
        for name in ("bad_fraction", "keep_uids"):
            changed = getattr(self, name) != getattr(SourceConfig(format=self.format), name)
            if changed and self.kind != "web_pool":
                raise ConfigError(f"{name}: only the world's web_pool reads it, not {self.where}")
        if self.languages is not None and not self.languages:
            raise ConfigError("languages: name at least one of en, zh")

    @property
    def world_languages(self) -> list[str]:
        """The languages of a world source: ``languages``, English where unset."""
        return self.languages or ["en"]

    @property
    def where(self) -> str:
        """How the source is named in messages: its path, dataset or world kind."""
        return self.path or self.dataset or f"world:{self.kind}"


# --------------------------------------------------------------------------------------------------
# The format table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """A format: the sample kinds it yields, the source keys it reads, and its reader (imported on use)."""

    kinds: tuple[SampleKind, ...]
    keys: frozenset[str]
    reader: str  # "module:function"
    needs_path: bool = True

    def read(self, source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter):
        return _function(self.reader)(source, kind, bad, counts)


def _function(reference: str):
    """The function a ``"module:function"`` reference names (imported on use)."""
    module, function = reference.split(":")
    return getattr(importlib.import_module(module), function)


COMMON_KEYS = frozenset({"format", "weight", "limit", "subset", "seed", "on_bad_sample", "split"})
CHAT_KINDS: tuple[SampleKind, ...] = ("chat", "image-chat")
# the world's av-chat kinds -> the streams their samples carry (mmfactory.data.world_source)
AV_WORLD_KINDS = {
    "video_captions": "video",
    "video_qa": "video",
    "audio_captions": "audio",
    "audio_qa": "audio",
    "av_qa": "audio-visual",  # reasoning questions that need both streams
    "av_conversations": "audio-visual",
    "av_narratives": "audio-visual",
}
# world kind -> the sample kinds it yields
WORLD_KINDS: dict[str, tuple[SampleKind, ...]] = {
    **{
        kind: ("image-chat",)
        for kind in ("captions", "vqa", "existence_pairs", "yesno_pairs", "choice", "llava", "pope")
    },
    "chat": CHAT_KINDS,
    "scenes": ("image-text",),
    "videos": ("video-text",),
    "labelled": ("labelled-image",),
    "preference": ("preference",),  # image pairs: faithful vs hallucinated descriptions and answers
    "article_preference": ("preference",),  # SAG C-DPO notes, languages in turn
    "articles": ("article",),
    "article_requests": ("article", "chat"),  # articles as a seller's message: NoteBench input, LLM chats
    "rankings": ("ranking",),  # every caption kind of a scene, graded, ranked (rank 1 best, ties)
    "web_pool": ("image-text", "image-chat"),  # Filter & Align's noisy pool (a filter's selection)
    **{kind: ("av-chat",) for kind in AV_WORLD_KINDS},  # Audio-Visual LLM's (data.world_source)
}
ENGLISH_ONLY = ("chat", "pope", "labelled", "preference", "rankings", "web_pool", *AV_WORLD_KINDS)
_FILES = "mmfactory.data.readers.conversations"
_AV = "mmfactory.data.readers.av_formats"  # audio-visual files as av-chat samples
FORMATS: dict[str, Format] = {
    "world": Format(
        tuple(dict.fromkeys(k for kinds in WORLD_KINDS.values() for k in kinds)),
        frozenset(
            {
                "kind",
                "size",
                "offset",
                "languages",
                "image_size",
                "chat_kinds",
                "details",
                "label",
                "max_objects",
                "bad_fraction",
                "keep_uids",
            }
        ),
        "mmfactory.data.world_source:read_world",
        needs_path=False,
    ),
    "llava": Format(
        CHAT_KINDS, frozenset({"path", "image_root", "missing_image_token"}), f"{_FILES}:read_llava"
    ),
    "sharegpt": Format(CHAT_KINDS, frozenset({"path", "image_root", "columns"}), f"{_FILES}:read_sharegpt"),
    "messages": Format(CHAT_KINDS, frozenset({"path", "image_root", "columns"}), f"{_FILES}:read_messages"),
    "alpaca": Format(("chat",), frozenset({"path", "columns"}), f"{_FILES}:read_alpaca"),
    "pairs": Format(("image-text",), frozenset({"path"}), "mmfactory.data.image_text:read_pairs_source"),
    "webdataset": Format(
        ("image-text",),
        frozenset({"path", "streaming", "shuffle_buffer", "num_samples"}),
        "mmfactory.data.image_text:read_webdataset_source",
    ),
    "csv": Format(
        ("video-text",), frozenset({"path", "video_root"}), "mmfactory.data.video_text:read_csv_source"
    ),
    "folder": Format(
        ("labelled-image",), frozenset({"path", "check_media"}), "mmfactory.data.images:read_folder_source"
    ),
    "idx": Format(
        ("labelled-image",), frozenset({"path", "labels"}), "mmfactory.data.images:read_idx_source"
    ),
    "preference": Format(
        ("preference",), frozenset({"path", "image_root"}), "mmfactory.data.preference:read_preference_source"
    ),
    "rankings": Format(
        ("ranking",), frozenset({"path", "image_root"}), "mmfactory.data.readers.ranking:read_rankings_source"
    ),
    "articles": Format(
        ("article",), frozenset({"path", "languages"}), "mmfactory.data.articles:read_articles_source"
    ),
    "msrvtt_qa": Format(
        ("av-chat",), frozenset({"path", "video_root", "check_media"}), f"{_AV}:read_msrvtt_qa_source"
    ),
    "audiocaps": Format(
        ("av-chat",), frozenset({"path", "audio_root", "check_media"}), f"{_AV}:read_audiocaps_source"
    ),
    "avsd": Format(("av-chat",), frozenset({"path", "video_root", "check_media"}), f"{_AV}:read_avsd_source"),
    "hf": Format(
        CHAT_KINDS,
        frozenset(
            {"path", "dataset", "name", "image_root", "columns", "streaming", "shuffle_buffer", "num_samples"}
        ),
        "mmfactory.data.readers.hf:read_hf",
        needs_path=False,
    ),
}


# --------------------------------------------------------------------------------------------------
# Reading and mixing
# --------------------------------------------------------------------------------------------------

# kind a task reads -> (another kind, "module:function" converting that kind's samples into the first)
CONVERSIONS: dict[SampleKind, tuple[SampleKind, str]] = {
    "video-text": ("image-text", "mmfactory.data.video_text:images_as_clips"),
}


def _yields(source: SourceConfig) -> tuple[str, tuple[SampleKind, ...]]:
    """How a source is named in messages, and the kinds it yields."""
    if source.format == "world":
        return f"world kind {source.kind!r}", WORLD_KINDS[source.kind]
    return f"format {source.format!r}", FORMATS[source.format].kinds


def _read_kind(source: SourceConfig, kind: SampleKind) -> tuple[SampleKind, str | None]:
    """The kind to read ``source`` as for a task reading ``kind``, and the converter to apply (or None)."""
    yields = _yields(source)[1]
    if kind not in yields and kind in CONVERSIONS and CONVERSIONS[kind][0] in yields:
        return CONVERSIONS[kind]
    return kind, None


def read_sources(
    sources: list[SourceConfig],
    kind: SampleKind,
    counts: Counter,
    prefix: str,
    max_bad_fraction: float | None = None,
    seed: int = 0,
    report: bool = True,
) -> ImageConversations | Any | None:
    """Read and mix ``sources`` as samples of ``kind`` (None when there are none).

    ``counts`` receives ``{prefix}/bad_{reason}`` for skipped records and the readers' own counts (e.g.
    ``{prefix}/llava_image_token_prepended``); the skip report is printed (``report``) as each source is
    read, and :class:`DataError` stops the run when skips exceed ``max_bad_fraction`` of a source.
    """
    check_kinds(sources, kind, prefix)
    if any(source.streaming for source in sources):
        return _stream(sources, kind, prefix, counts)
    parts, weights = [], []
    for source in sources:
        spec = FORMATS[source.format]
        bad, local = BadSampleCounter(max_examples=MAX_EXAMPLES), Counter()
        read_kind, converter = _read_kind(source, kind)
        part = spec.read(source, read_kind, bad, local)
        if converter is not None:
            part = _function(converter)(part)
        seen = bad.total + len(part)  # records read, before the limit
        counts.update({f"{prefix}/{key}": n for key, n in local.items()})
        counts.update({f"{prefix}/bad_{reason}": n for reason, n in bad.summary().items()})
        if bad.total and report:
            print(f"[data] {source.where}: {bad.report(MAX_EXAMPLES)}", file=sys.stderr, flush=True)
        if max_bad_fraction is not None and seen and bad.total / seen > max_bad_fraction:
            raise DataError(
                f"{source.where}: {bad.total} of {seen} records are bad "
                f"({bad.total / seen:.1%} > max_bad_fraction {max_bad_fraction:.1%}); "
                + bad.report(MAX_EXAMPLES)
            )
        if source.limit is not None:
            part = _subset(part, source)
        if kind == "chat" and any(part.num_images):
            raise ConfigError(f"{prefix}: {source.where} has images, but this task reads text-only chats")
        parts.append(part)
        weights.append(source.weight)
    return mix(parts, weights, seed) if parts else None


def _stream(sources: list[SourceConfig], kind: SampleKind, prefix: str, counts: Counter):
    """The one streaming source of a split (:mod:`mmfactory.data.streaming`)."""
    from mmfactory.data.streaming import read_webdataset_stream

    if len(sources) > 1:
        raise ConfigError(
            f"{prefix}: a streaming source must be the split's only source (mixing streams: not yet)"
        )
    if prefix != "train":
        raise ConfigError(f"{prefix}: evaluation reads its samples up front; set streaming: false there")
    if sources[0].format == "hf":
        from mmfactory.data.readers.hf import read_hf_stream

        return read_hf_stream(sources[0], kind, prefix, counts)
    return read_webdataset_stream(sources[0], prefix, counts)


def _subset(part, source: SourceConfig):
    """The first ``limit`` samples, or (``subset: random``) ``limit`` drawn with ``seed``, in order."""
    if source.subset == "first" or source.limit >= len(part):
        return part.first(source.limit)
    gen = torch.Generator().manual_seed(source.seed)
    return part.select(sorted(torch.randperm(len(part), generator=gen)[: source.limit].tolist()))


def check_kinds(sources: list[SourceConfig], kind: SampleKind, where: str) -> None:
    """Refuse a source that does not yield ``kind`` (checked when the recipe is validated)."""
    for index, source in enumerate(sources):
        what, yields = _yields(source)
        converted = _read_kind(source, kind)[1] is not None
        if converted and source.streaming:
            raise ConfigError(
                f"{where}[{index}]: {what} is read as {kind!r} up front only; set streaming: false"
            )
        if kind not in yields and not converted:
            raise ConfigError(
                f"{where}[{index}]: {what} yields {', '.join(yields)} samples, this task reads {kind!r}"
            )


def stage_sources(data_cfg: Any) -> list[tuple[str, int, SourceConfig]]:
    """``(field, index, source)`` for every source of every source list of a stage's data config."""
    return [
        (f.name, index, source)
        for f in dataclasses.fields(data_cfg)
        if isinstance(sources := getattr(data_cfg, f.name), list)
        and all(isinstance(s, SourceConfig) for s in sources)
        for index, source in enumerate(sources)
    ]


def check_source_paths(data_cfg: Any, where: str) -> None:
    """Refuse a source whose ``path`` (or ``labels``, ``image_root``, ``video_root``, ``audio_root``) names
    nothing, for every source list of a stage's data config: checked before any stage trains."""
    for name, index, source in stage_sources(data_cfg):
        for key in ("path", "labels", "image_root", "video_root", "audio_root"):
            value = getattr(source, key)
            if value is None or (key == "path" and source.format == "webdataset"):
                continue
            if not glob.glob(str(Path(value).expanduser())):  # hf streams may name a glob of files
                raise ConfigError(f"{where}.{name}[{index}].{key}: {value!r} does not exist")
        if source.format == "webdataset":
            from mmfactory.data.streaming import expand_shards

            try:
                shards = expand_shards(source.path)
            except BadSampleError:
                shards = []
            missing = next((s for s in shards if not Path(s).is_file()), None) if shards else source.path
            if missing is not None:
                raise ConfigError(f"{where}.{name}[{index}].path: no shard {missing!r}")


def check_fraction(max_bad_fraction: float | None) -> None:
    """Refuse a ``max_bad_fraction`` outside [0, 1) (1 or more would never stop anything)."""
    if max_bad_fraction is not None and not 0 <= max_bad_fraction < 1:
        raise ConfigError(f"max_bad_fraction: must be in [0, 1), got {max_bad_fraction}")


def mix(parts: list, weights: list[float | None], seed: int = 0):
    """One collection (:class:`ImageConversations`, :class:`~mmfactory.data.image_text.ImageCaptions`) from
    several of one kind, in source order.

    With no weight set it is their concatenation. With weights (all set) it holds ``N = sum of sizes``
    samples of which ``round(N * w_i / sum w)`` come from source ``i``: each source is walked in a seeded
    permutation, repeated when it is shorter than its share, so proportions are exact and the result is
    a plain map-style dataset (resumed exactly by the step sampler).
    """
    if all(w is None for w in weights):
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out
    if any(w is None for w in weights):
        raise ConfigError("weight: set it on every source of the stage or on none")
    total = sum(len(p) for p in parts)
    shares = _shares(total, weights)
    picked = []
    for index, (part, share) in enumerate(zip(parts, shares, strict=True)):
        size = len(part)
        if share and not size:
            raise ConfigError(f"weight: source {index} has no samples to draw its share of {share} from")
        gen = torch.Generator().manual_seed(seed + index)
        reps = -(-share // size) if size else 0
        order = torch.cat([torch.randperm(size, generator=gen) for _ in range(reps)]) if reps else None
        picked.append(part.select(order[:share].tolist() if order is not None else []))
    return mix(picked, [None] * len(picked))


def _shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders), summing exactly to ``total``."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
