"""What a data source is: :class:`SourceConfig` (one entry of a stage's ``data.train`` / ``data.eval``), the
sample kinds, and the format table :data:`FORMATS` (each format's kinds, the keys it reads and its reader,
named as ``"module:function"``). Declarations only: reading is :mod:`mmfactory.data.sources`, which the
readers never import, so the readers can import these types without a cycle.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Literal

from mmfactory.config import ConfigError

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
    """A format: the sample kinds it yields, the source keys it reads, and its reader (``"module:function"``,
    imported by :mod:`mmfactory.data.sources` when a source of the format is read)."""

    kinds: tuple[SampleKind, ...]
    keys: frozenset[str]
    reader: str  # "module:function"
    needs_path: bool = True


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


def check_fraction(max_bad_fraction: float | None) -> None:
    """Refuse a ``max_bad_fraction`` outside [0, 1) (1 or more would never stop anything)."""
    if max_bad_fraction is not None and not 0 <= max_bad_fraction < 1:
        raise ConfigError(f"max_bad_fraction: must be in [0, 1), got {max_bad_fraction}")


def check_sources(train: list[SourceConfig], max_bad_fraction: float | None) -> None:
    """The checks every data section shares: at least one training source, a bad-record share in [0, 1]."""
    if not train:
        raise ConfigError("train: at least one source is required")
    check_fraction(max_bad_fraction)
