"""Image-text webdataset shards: uncompressed tars of ``{key}.png``, ``{key}.txt``, ``{key}.json``."""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfactory.data.media import load_image
from mmfactory.data.policy import (
    BadReason,
    BadSampleCounter,
    BadSampleError,
    BadSamplePolicy,
    check_policy,
    handle_bad_sample,
)
from mmfactory.data.readers.records import Fields, RecordDataset, check_text, collect_records

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# As webdataset: the key is the member path up to the first dot of its file name, the rest the extension.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


@dataclass(frozen=True)
class TarMember:
    """Where a member's bytes lie in an uncompressed tar."""

    shard: Path
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as file:
            file.seek(self.offset)
            return file.read(self.size)


@dataclass
class _Member:
    location: TarMember
    data: bytes


def _iter_groups(
    shard: Path, on_bad_sample: BadSamplePolicy, counter: BadSampleCounter
) -> Iterator[tuple[str, Any]]:
    """``("sample 'key'", {"key", "members": {extension: _Member}, "duplicates"})`` per run of members
    sharing a key. A tar that stops being readable goes to the policy once, for the rest of the shard."""
    key, members, duplicates, name = None, {}, [], None
    try:
        with tarfile.open(shard, mode="r|") as tar:
            for member in tar:
                match = _KEY_AND_EXTENSION.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                if match[1] != key:
                    if key is not None:
                        yield f"sample {key!r}", {"key": key, "members": members, "duplicates": duplicates}
                    key, members, duplicates = match[1], {}, []
                name, extension = member.name, match[2].lower()
                if extension in members:
                    duplicates.append(member.name)
                data = tar.extractfile(member).read()
                members[extension] = _Member(TarMember(shard, member.offset_data, member.size), data)
            if key is not None:
                yield f"sample {key!r}", {"key": key, "members": members, "duplicates": duplicates}
    except tarfile.TarError as error:
        where = f"at member {name!r}" if name else "at the start"
        bad = BadSampleError(
            f"unreadable tar {where}, rest of shard lost: {error}", reason=BadReason.CORRUPT_ARCHIVE
        )
        handle_bad_sample(bad.located(shard, "archive"), on_bad_sample, counter)


def _parse_group(raw: dict[str, Any], check_media: bool) -> Fields:
    key, members = raw["key"], raw["members"]
    if raw["duplicates"]:
        raise BadSampleError(f"duplicate members {raw['duplicates']}", reason=BadReason.INVALID_RECORD)
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image is None or "txt" not in members:
        missing = "an image member (png/jpg/jpeg/webp)" if image is None else f"{key}.txt"
        raise BadSampleError(f"no {missing}", reason=BadReason.MISSING_FILE)
    try:
        text = members["txt"].data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadSampleError(f"{key}.txt is not UTF-8: {error}", reason=BadReason.INVALID_RECORD) from error
    check_text(text, f"{key}.txt")
    sample_id = key
    if "json" in members:
        try:
            meta = json.loads(members["json"].data)
        except ValueError as error:
            raise BadSampleError(
                f"{key}.json: malformed JSON: {error}", reason=BadReason.MALFORMED_JSON
            ) from error
        if not isinstance(meta, dict):
            raise BadSampleError(f"{key}.json must hold a JSON object", reason=BadReason.INVALID_RECORD)
        sample_id = meta.get("id", key)
    if check_media:
        load_image(image.data)
    return {"id": sample_id, "key": key, "image": image.location, "text": text}


def _decode_group(fields: Fields) -> Fields:
    return {**fields, "image": load_image(fields["image"].read_bytes())}


def read_webdataset(
    shards: str | Path | Sequence[str | Path],
    *,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = True,
) -> RecordDataset:
    """Samples ``{"id" (from {key}.json, else the key), "key", "image": uint8 [H, W, 3], "text"}``.

    Each shard is streamed once with ``tarfile`` at construction: members are grouped by key (a
    sample's members are consecutive, as webdataset writes them), texts and JSON are read and checked,
    images decoded once if ``check_media``. A record keeps its image's byte offset in the shard, so
    ``dataset[i]`` reads just those bytes; shards must therefore be uncompressed ``.tar``.
    """
    check_policy(on_bad_sample)
    counter = counter if counter is not None else BadSampleCounter()
    records = []
    for shard in [shards] if isinstance(shards, str | Path) else shards:
        shard = Path(shard)
        groups = _iter_groups(shard, on_bad_sample, counter)
        records += collect_records(
            shard, groups, lambda raw: _parse_group(raw, check_media), None, on_bad_sample, counter
        )
    return RecordDataset(records, _decode_group, counter)
