"""LLaVA conversations: a JSON list of ``{"id", "image", "conversations": [{"from", "value"}, ...]}``."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

from mmfactory.data.media import load_image
from mmfactory.data.policy import BadReason, BadSampleCounter, BadSampleError, BadSamplePolicy
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    media_file,
    parse_messages,
    read_annotation_file,
    require,
)

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _parse_llava(raw: dict[str, Any], base_dir: Path, missing_image_token: str = "error") -> Fields:
    images = raw.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise BadSampleError("'image' must be a path or a list of paths", reason=BadReason.INVALID_RECORD)
    conversations = parse_messages(raw.get("conversations"), "from", "value", LLAVA_ROLES, "conversations")
    num_placeholders = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in conversations)
    missing = num_placeholders == 0 and len(images) == 1
    if missing and missing_image_token == "prepend":  # LLaVA puts the image before the first user turn
        first = next(i for i, m in enumerate(conversations) if m["role"] == "user")
        turn = conversations[first]
        conversations[first] = {**turn, "content": f"{IMAGE_PLACEHOLDER}\n{turn['content']}"}
    elif missing and missing_image_token == "skip":
        return {
            "id": raw.get("id"),
            "images": [],
            "conversations": conversations,
            "missing_image_token": True,
        }
    elif num_placeholders != len(images):
        problem = f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images"
        raise BadSampleError(problem, reason=BadReason.PLACEHOLDER_MISMATCH)
    return {
        "id": require(raw, "id", (str, int)),
        "images": [media_file(base_dir, image, "image") for image in images],
        "conversations": conversations,
        "image_token_prepended": missing,
    }


def decode_images(fields: Fields) -> Fields:
    """``fields`` with its ``images`` paths decoded to uint8 ``[H, W, 3]`` arrays."""
    return {**fields, "images": [load_image(image) for image in fields["images"]]}


def read_llava(
    path: str | Path,
    *,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
    image_root: str | Path | None = None,
    missing_image_token: Literal["prepend", "skip", "error"] = "error",
) -> RecordDataset:
    """Samples ``{"id", "images": [uint8 [H, W, 3], ...], "conversations": [{"role", "content"}, ...]}``.

    ``image`` may be one path, a list of paths, or absent (a text-only conversation); relative paths
    resolve against ``image_root`` (LLaVA's ``--image_folder``), else the file's folder. Roles map
    ``human -> user``, ``gpt -> assistant``; the ``<image>`` placeholders stay in the content (the
    collator expands them) and their count over all turns must equal the number of images. A row with
    one image and no placeholder follows ``missing_image_token``: ``prepend`` puts ``<image>\n`` before
    the first user turn (field ``image_token_prepended``), ``skip`` leaves the row out (the caller counts
    it: field ``missing_image_token``), ``error`` makes it a bad sample.
    """
    return read_annotation_file(
        path,
        partial(_parse_llava, missing_image_token=missing_image_token),
        decode_images,
        json_list=True,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
        base_dir=image_root,
    )
