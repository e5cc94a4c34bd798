"""Video formats: MSR-VTT-style captions ``{split}.csv`` (header ``video_id,sentence``; several rows per
video) and video / audio-visual QA JSONL ``{"video_id", "question", "answer", "type"}``, with the videos
at ``videos/{video_id}.mp4`` next to the annotation file."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfactory.data.media import FrameSampling, load_video
from mmfactory.data.policy import (
    BadSampleCounter,
    BadSampleError,
    BadSamplePolicy,
    check_policy,
    handle_bad_sample,
)
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    check_text,
    collect_records,
    iter_csv_rows,
    media_file,
    read_annotation_file,
    require_text,
)

CAPTION_COLUMNS = ("video_id", "sentence")


def _iter_caption_rows(
    path: Path, on_bad_sample: BadSamplePolicy, counter: BadSampleCounter
) -> Iterator[tuple[int, str, str]]:
    """``(line, video_id, sentence)`` per good row (:func:`iter_csv_rows`: one physical line per record)."""
    for number, fields in iter_csv_rows(path, CAPTION_COLUMNS, on_bad_sample, counter):
        try:
            check_text(fields["video_id"], "'video_id'")
            check_text(fields["sentence"], "'sentence'")
        except BadSampleError as error:
            handle_bad_sample(error.located(path, f"line {number}"), on_bad_sample, counter)
        else:
            yield number, fields["video_id"], fields["sentence"]


def _decode_video(
    fields: Fields,
    num_frames: int,
    sampling: FrameSampling,
    with_audio: bool,
    audio_sample_rate: int | None,
) -> Fields:
    # Random sampling draws from torch's RNG, which DataLoader seeds per worker and epoch.
    rng = np.random.default_rng(int(torch.randint(2**62, ()))) if sampling == "random" else None
    clip = load_video(fields["video"], num_frames, sampling, rng, with_audio, audio_sample_rate)
    return {
        **fields,
        "video": clip.frames,
        "audio": clip.audio,
        "sample_rate": clip.sample_rate,
        "num_padded_frames": clip.num_padded_frames,
    }


def read_video_captions(
    path: str | Path,
    *,
    num_frames: int = 8,
    sampling: FrameSampling = "uniform",
    with_audio: bool = False,
    audio_sample_rate: int | None = 16000,
    video_dir: str = "videos",
    extension: str = ".mp4",
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> RecordDataset:
    """One sample per video: ``{"video_id", "captions": [str, ...] (file order), "video": uint8 [T, H, W, 3],
    "audio": float32 [S] or None, "sample_rate": int or None, "num_padded_frames": int}``.

    Frames are chosen by :func:`mmfactory.data.media.frame_indices` (``T = num_frames``); a video
    shorter than ``T`` frames repeats its last frame ``num_padded_frames`` times. A bad caption row is
    skipped on its own; a missing or corrupt video skips the video with all its captions (one count).
    """
    check_policy(on_bad_sample)
    path, counter = Path(path), counter if counter is not None else BadSampleCounter()
    lines: dict[str, list[int]] = {}
    captions: dict[str, list[str]] = {}
    for line, video_id, sentence in _iter_caption_rows(path, on_bad_sample, counter):
        lines.setdefault(video_id, []).append(line)
        captions.setdefault(video_id, []).append(sentence)
    groups = [
        (
            f"line{'s' * (len(lines[v]) > 1)} {', '.join(map(str, lines[v]))}",
            {"video_id": v, "captions": captions[v]},
        )
        for v in captions
    ]

    def parse(raw: dict) -> Fields:
        return {**raw, "video": media_file(path.parent, f"{video_dir}/{raw['video_id']}{extension}", "video")}

    decode = partial(
        _decode_video,
        num_frames=num_frames,
        sampling=sampling,
        with_audio=with_audio,
        audio_sample_rate=audio_sample_rate,
    )
    check = _video_check(with_audio)
    records = collect_records(path, groups, parse, check if check_media else None, on_bad_sample, counter)
    return RecordDataset(records, decode, counter)


def _video_check(with_audio: bool) -> partial:
    """Decode once at construction without drawing from torch's RNG (uniform, one frame, no resampling)."""
    return partial(
        _decode_video, num_frames=1, sampling="uniform", with_audio=with_audio, audio_sample_rate=None
    )


def _parse_video_qa(raw: dict[str, Any], base_dir: Path, video_dir: str, extension: str) -> Fields:
    video_id = require_text(raw, "video_id")
    return {
        "video_id": video_id,
        **{key: require_text(raw, key) for key in ("question", "answer", "type")},
        "video": media_file(base_dir, f"{video_dir}/{video_id}{extension}", "video"),
    }


def read_video_qa(
    path: str | Path,
    *,
    num_frames: int = 8,
    sampling: FrameSampling = "uniform",
    with_audio: bool = False,
    audio_sample_rate: int | None = 16000,
    video_dir: str = "videos",
    extension: str = ".mp4",
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> RecordDataset:
    """Video QA (``qa_{split}.jsonl``) or, with ``with_audio``, audio-visual QA (``avqa_{split}.jsonl``):
    samples ``{"video_id", "question", "answer", "type", "video", "audio", "sample_rate",
    "num_padded_frames"}`` decoded as in :func:`read_video_captions`."""
    parse = partial(_parse_video_qa, video_dir=video_dir, extension=extension)
    decode = partial(
        _decode_video,
        num_frames=num_frames,
        sampling=sampling,
        with_audio=with_audio,
        audio_sample_rate=audio_sample_rate,
    )
    return read_annotation_file(
        path,
        parse,
        decode,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
        check=_video_check(with_audio),
    )
