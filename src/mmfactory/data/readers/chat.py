"""Chat SFT JSONL ``{"id", "messages": [{"role": "user"|"assistant"|"system", "content"}, ...]}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfactory.data.policy import BadSampleCounter, BadSamplePolicy
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    parse_messages,
    read_annotation_file,
    require,
)

CHAT_ROLES = {role: role for role in ("system", "user", "assistant")}


def _parse_chat(raw: dict[str, Any], base_dir: Path) -> Fields:
    messages = parse_messages(raw.get("messages"), "role", "content", CHAT_ROLES, "messages")
    return {"id": require(raw, "id", (str, int)), "messages": messages}


def read_chat(
    path: str | Path, *, on_bad_sample: BadSamplePolicy = "error", counter: BadSampleCounter | None = None
) -> RecordDataset:
    """Samples ``{"id", "messages"}``: contents non-empty, at least one assistant message."""
    return read_annotation_file(
        path,
        _parse_chat,
        dict,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=False,
    )
