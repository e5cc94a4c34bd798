"""Audio formats: AudioCaps-style captions, a JSON list of ``{"id", "audio": "clips/x.wav", "caption"}``,
and audio QA JSONL ``{"id", "question", "answer", "type"}`` whose clip is ``clips/{id}.wav``."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from mmfactory.data.media import load_audio
from mmfactory.data.policy import BadSampleCounter, BadSamplePolicy
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    media_file,
    read_annotation_file,
    require,
    require_text,
)


def _parse_audio_caption(raw: dict[str, Any], base_dir: Path) -> Fields:
    return {
        "id": require(raw, "id", (str, int)),
        "audio": media_file(base_dir, raw.get("audio"), "audio"),
        "caption": require_text(raw, "caption"),
    }


def _decode_audio(fields: Fields, sample_rate: int, resample: bool) -> Fields:
    audio, rate = load_audio(fields["audio"], expected_sr=sample_rate, resample=resample)
    return {**fields, "audio": audio, "sample_rate": rate}


def read_audio_captions(
    path: str | Path,
    *,
    sample_rate: int = 16000,
    resample: bool = False,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> RecordDataset:
    """Samples ``{"id", "audio": float32 [S] (mono), "sample_rate", "caption"}``.

    A clip at another rate than ``sample_rate`` is a bad sample unless ``resample`` (then it is
    converted, see :func:`mmfactory.data.media.resample_audio`).
    """
    decode = partial(_decode_audio, sample_rate=sample_rate, resample=resample)
    return read_annotation_file(
        path,
        _parse_audio_caption,
        decode,
        json_list=True,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
    )


def _parse_audio_qa(raw: dict[str, Any], base_dir: Path, clip_dir: str, extension: str) -> Fields:
    clip_id = require(raw, "id", (str, int))
    return {
        "id": clip_id,
        **{key: require_text(raw, key) for key in ("question", "answer", "type")},
        "audio": media_file(base_dir, f"{clip_dir}/{clip_id}{extension}", "audio"),
    }


def read_audio_qa(
    path: str | Path,
    *,
    sample_rate: int = 16000,
    resample: bool = False,
    clip_dir: str = "clips",
    extension: str = ".wav",
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> RecordDataset:
    """Samples ``{"id", "question", "answer", "type", "audio": float32 [S], "sample_rate"}``; the clip of
    record ``id`` is ``{clip_dir}/{id}{extension}`` next to the file (the layout ``world export`` writes)."""
    parse = partial(_parse_audio_qa, clip_dir=clip_dir, extension=extension)
    decode = partial(_decode_audio, sample_rate=sample_rate, resample=resample)
    return read_annotation_file(
        path,
        parse,
        decode,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
    )
