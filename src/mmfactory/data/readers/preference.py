"""Preference JSONL: pairs ``{"id", "prompt", "chosen", "rejected", "image"?}`` or TRL's unpaired KTO rows
``{"id", "prompt", "completion", "label": true | false, "image"?}``."""

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


def _parse_preference(raw: dict[str, Any], base_dir: Path) -> Fields:
    if "completion" in raw:  # an unpaired KTO row
        if "chosen" in raw or "rejected" in raw:
            problem = "a row is a pair (chosen, rejected) or a KTO row (completion, label), not both"
            raise BadSampleError(problem, reason=BadReason.INVALID_RECORD)
        fields = {key: require_text(raw, key) for key in ("prompt", "completion")}
        fields["label"] = require(raw, "label", bool)
    else:
        fields = {key: require_text(raw, key) for key in ("prompt", "chosen", "rejected")}
        if fields["chosen"] == fields["rejected"]:
            raise BadSampleError("'chosen' and 'rejected' are identical", reason=BadReason.INVALID_RECORD)
    image = raw.get("image")
    return {
        "id": require(raw, "id", (str, int)),
        **fields,
        "image": None if image is None else media_file(base_dir, image, "image"),
    }


def read_preference(
    path: str | Path,
    *,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
    image_root: str | Path | None = None,
) -> RecordDataset:
    """Samples ``{"id", "prompt", "chosen", "rejected" | "completion", "label", "image": uint8 [H, W, 3] or
    None}``; image paths resolve against ``image_root`` (default: the file's folder)."""
    return read_annotation_file(
        path,
        _parse_preference,
        decode_image,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
        base_dir=image_root,
    )
