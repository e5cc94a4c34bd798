"""Image question answering JSONL: VQA ``{"id", "image", "question", "answer", "type"}`` and POPE probes
``{"id", "image", "question", "label": "yes"|"no", "object"}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfactory.data.policy import BadReason, BadSampleCounter, BadSampleError, BadSamplePolicy
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    decode_image,
    media_file,
    read_annotation_file,
    require,
    require_text,
)

POPE_LABELS = ("yes", "no")


def _parse_vqa(raw: dict[str, Any], base_dir: Path) -> Fields:
    return {
        "id": require(raw, "id", (str, int)),
        "image": media_file(base_dir, raw.get("image"), "image"),
        **{key: require_text(raw, key) for key in ("question", "answer", "type")},
    }


def _parse_pope(raw: dict[str, Any], base_dir: Path) -> Fields:
    label = require(raw, "label", str)
    if label not in POPE_LABELS:
        raise BadSampleError(f"'label' must be 'yes' or 'no', got {label!r}", reason=BadReason.INVALID_RECORD)
    return {
        "id": require(raw, "id", (str, int)),
        "image": media_file(base_dir, raw.get("image"), "image"),
        "question": require_text(raw, "question"),
        "label": label,
        "object": require_text(raw, "object"),
    }


def read_vqa(
    path: str | Path,
    *,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> RecordDataset:
    """Samples ``{"id", "image": uint8 [H, W, 3], "question", "answer", "type"}``."""
    return read_annotation_file(
        path,
        _parse_vqa,
        decode_image,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
    )


def read_pope(
    path: str | Path,
    *,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> RecordDataset:
    """Samples ``{"id", "image": uint8 [H, W, 3], "question", "label": "yes"|"no", "object"}``."""
    return read_annotation_file(
        path,
        _parse_pope,
        decode_image,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
    )
