"""Image-text pairs JSONL ``{"id", "image", "text"}`` (``pairs/{split}.jsonl``; the web pool with ``uid``)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from mmfactory.data.policy import BadSampleCounter, BadSamplePolicy
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    decode_image,
    media_file,
    read_annotation_file,
    require,
    require_text,
)


def _parse_pair(raw: dict[str, Any], base_dir: Path, id_field: str) -> Fields:
    return {
        id_field: require(raw, id_field, (str, int)),
        "image": media_file(base_dir, raw.get("image"), "image"),
        "text": require_text(raw, "text"),
    }


def read_pairs(
    path: str | Path,
    *,
    id_field: str = "id",
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> RecordDataset:
    """Samples ``{id_field, "image": uint8 [H, W, 3], "text": str}``.

    ``id_field="uid"`` reads the web pool ``pool/pool.jsonl``.
    """
    parse = partial(_parse_pair, id_field=id_field)
    return read_annotation_file(
        path,
        parse,
        decode_image,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
    )
