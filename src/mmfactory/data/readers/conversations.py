"""Conversation formats as sources of ``chat`` / ``image-chat`` samples (see :mod:`mmfactory.data.sources`).

* ``llava``: LLaVA JSON (``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``),
  images under ``image_root`` (LLaVA's ``--image_folder``) or beside the file.
* ``sharegpt``: ``{"conversations": [{"from", "value"}], "images"?: [path, ...]}`` (roles human/user,
  gpt/assistant, system), JSON list or JSONL.
* ``messages``: OpenAI / TRL style ``{"messages": [{"role", "content"}], "images"?: [path, ...]}``; a content
  may be a list of parts ``[{"type": "image"}, {"type": "text", "text": ...}]`` (an image part becomes
  ``<image>\\n``), JSON list or JSONL.
* ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}``; the
  user turn is ``instruction`` then ``input`` on a new line (LLaMA-Factory's rendering).

``columns`` renames a file's keys to these (``{conversations: dialog}``). A ``.jsonl`` file is read line by
line; any other suffix as one JSON list. Media paths are checked to exist when the file is read and decoded
when a sample is drawn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from mmfactory.data.multimodal import ImageConversations
from mmfactory.data.policy import BadReason, BadSampleCounter, BadSampleError
from mmfactory.data.readers.llava import IMAGE_PLACEHOLDER, decode_images
from mmfactory.data.readers.llava import read_llava as read_llava_file
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    check_text,
    media_file,
    parse_messages,
    read_annotation_file,
    require,
    require_text,
)
from mmfactory.data.source_config import SampleKind, SourceConfig

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MESSAGE_ROLES = {role: role for role in ("system", "user", "assistant")}


def _conversations(dataset: RecordDataset, key: str) -> ImageConversations:
    records = dataset.records
    return ImageConversations(
        [r.fields[key] for r in records],
        [len(r.fields["images"]) for r in records],
        partial(_images_of, dataset),
    )


def read_llava(
    source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter
) -> ImageConversations:
    dataset = read_llava_file(
        source.path,
        on_bad_sample=source.on_bad_sample,
        counter=bad,
        check_media=False,
        image_root=source.image_root,
        missing_image_token=source.missing_image_token,
    )
    skipped = [r for r in dataset.records if r.fields.get("missing_image_token")]
    if skipped:
        counts["llava_skipped_missing_image_token"] += len(skipped)
        dataset.records = [r for r in dataset.records if not r.fields.get("missing_image_token")]
    prepended = sum(r.fields["image_token_prepended"] for r in dataset.records)
    if prepended:
        counts["llava_image_token_prepended"] += prepended
    return _conversations(dataset, "conversations")


# -- row parsers: raw record -> {"messages", "images": [Path]} -------------------------------------------


def _renamed(raw: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """``raw`` with the file's keys renamed to ours (``columns``: our field -> the file's key)."""
    if not columns:
        return raw
    out = {k: v for k, v in raw.items() if k not in columns.values()}
    out.update({ours: raw[theirs] for ours, theirs in columns.items() if theirs in raw})
    return out


def _images(raw: dict[str, Any], base_dir: Path, messages: list[dict[str, str]]) -> list[Path]:
    images = raw.get("images", raw.get("image"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise BadSampleError("'images' must be a path or a list of paths", reason=BadReason.INVALID_RECORD)
    check_placeholders(messages, len(images))
    return [media_file(base_dir, image, "image") for image in images]


def check_placeholders(messages: list[dict[str, str]], num_images: int) -> None:
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != num_images:
        problem = f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {num_images} images"
        raise BadSampleError(problem, reason=BadReason.PLACEHOLDER_MISMATCH)


def sharegpt_messages(raw: dict[str, Any]) -> list[dict[str, str]]:
    return parse_messages(raw.get("conversations"), "from", "value", SHAREGPT_ROLES, "conversations")


def _flatten_parts(turns: Any) -> Any:
    """Contents given as parts (``[{"type": "image"}, {"type": "text", "text"}]``) -> one string."""
    if not isinstance(turns, list):
        return turns
    out = []
    for turn in turns:
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    texts.append(f"{IMAGE_PLACEHOLDER}\n")
                elif kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    raise BadSampleError(
                        f"content part {part!r} is not an image or text part", reason=BadReason.INVALID_RECORD
                    )
            turn = {**turn, "content": "".join(texts)}
        out.append(turn)
    return out


def openai_messages(raw: dict[str, Any]) -> list[dict[str, str]]:
    turns = _flatten_parts(raw.get("messages"))
    return parse_messages(turns, "role", "content", MESSAGE_ROLES, "messages")


def alpaca_messages(raw: dict[str, Any]) -> list[dict[str, str]]:
    instruction, output = require_text(raw, "instruction"), require_text(raw, "output")
    extra = raw.get("input") or ""
    if not isinstance(extra, str):
        raise BadSampleError("field 'input' must be str", reason=BadReason.INVALID_RECORD)
    messages = []
    if raw.get("system"):
        messages.append({"role": "system", "content": require(raw, "system", str)})
    for position, pair in enumerate(raw.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise BadSampleError(
                f"history[{position}] must be [user, assistant]", reason=BadReason.INVALID_RECORD
            )
        for role, text in zip(("user", "assistant"), pair, strict=True):
            check_text(text, f"history[{position}]")
            messages.append({"role": role, "content": text})
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _parse_row(
    raw: dict[str, Any], base_dir: Path, columns: dict[str, str], messages_of: Callable[[dict], list]
) -> Fields:
    raw = _renamed(raw, columns)
    messages = messages_of(raw)
    return {"messages": messages, "images": _images(raw, base_dir, messages)}


def _images_of(dataset: RecordDataset, index: int) -> list:
    return dataset[index]["images"]


def _read_rows(
    source: SourceConfig, bad: BadSampleCounter, messages_of: Callable[[dict], list]
) -> ImageConversations:
    dataset = read_annotation_file(
        source.path,
        partial(_parse_row, columns=source.columns, messages_of=messages_of),
        decode_images,
        json_list=Path(source.path).suffix != ".jsonl",
        on_bad_sample=source.on_bad_sample,
        counter=bad,
        check_media=False,
        base_dir=source.image_root,
    )
    return _conversations(dataset, "messages")


def read_sharegpt(
    source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter
) -> ImageConversations:
    return _read_rows(source, bad, sharegpt_messages)


def read_messages(
    source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter
) -> ImageConversations:
    return _read_rows(source, bad, openai_messages)


def read_alpaca(
    source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter
) -> ImageConversations:
    return _read_rows(source, bad, alpaca_messages)
