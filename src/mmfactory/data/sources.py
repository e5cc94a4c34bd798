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
import glob
import importlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mmfactory.config import ConfigError
from mmfactory.data.multimodal import ImageConversations
from mmfactory.data.policy import BadSampleCounter, BadSampleError, DataError
from mmfactory.data.samples import mix
from mmfactory.data.source_config import FORMATS, WORLD_KINDS, SampleKind, SourceConfig

MAX_EXAMPLES = 5


def _function(reference: str):
    """The function a ``"module:function"`` reference names (imported on use)."""
    module, function = reference.split(":")
    return getattr(importlib.import_module(module), function)


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
        part = _function(spec.reader)(source, read_kind, bad, local)
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
