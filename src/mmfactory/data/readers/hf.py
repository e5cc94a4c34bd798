"""Hugging Face ``datasets`` as a source of ``chat`` / ``image-chat`` samples (``format: hf``).

``dataset``: a hub id (``datasets.load_dataset``, which uses the local cache and honours
``HF_HUB_OFFLINE``) or a folder written by ``save_to_disk`` (``datasets.load_from_disk``); ``path``: local
files by suffix (``.parquet``, ``.arrow``, ``.json`` / ``.jsonl``, ``.csv``). ``split`` picks the split
(files have one: ``train``). A row holds ``messages`` (OpenAI / TRL style), ``conversations`` (ShareGPT) or
``instruction`` / ``output`` (alpaca), looked for in that order after the ``columns`` renames, and its
images in ``images`` (a list) or ``image``: ``datasets.Image`` values, raw bytes, or paths (relative to
``image_root``). Text columns are read and checked up front; images are decoded when a sample is drawn.

With ``streaming: true`` the rows are streamed instead (:class:`HFStream`, a ``datasets`` streaming
``IterableDataset``; ``path`` may then be a glob of files, each one shard) and checked as they come.
"""

from __future__ import annotations

import glob
import io
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmfactory.config import ConfigError
from mmfactory.data.media import load_image
from mmfactory.data.multimodal import ImageConversations
from mmfactory.data.policy import BadReason, BadSampleCounter, BadSampleError, handle_bad_sample
from mmfactory.data.readers.conversations import (
    alpaca_messages,
    check_placeholders,
    openai_messages,
    sharegpt_messages,
)
from mmfactory.data.source_config import SampleKind, SourceConfig
from mmfactory.data.streaming import SampleStream, stream_settings

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
SYNTAXES = (
    ("messages", openai_messages),
    ("conversations", sharegpt_messages),
    ("instruction", alpaca_messages),
)


def load_hf(source: SourceConfig):
    """The source's ``datasets.Dataset`` (map-style, memory-mapped), or with ``streaming`` its
    ``IterableDataset``."""
    import datasets

    streaming = source.streaming
    if source.path is not None:
        builder = BUILDERS.get(Path(source.path).suffix)
        if builder is None:
            raise ConfigError(f"path: {source.path} has none of the suffixes {', '.join(BUILDERS)}")
        if not glob.glob(str(Path(source.path).expanduser())):
            raise BadSampleError("file not found", reason=BadReason.MISSING_FILE, file=source.path)
        return datasets.load_dataset(builder, data_files=source.path, split="train", streaming=streaming)
    folder = Path(source.dataset).expanduser()
    if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(folder))
        loaded = loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return (
            loaded.to_iterable_dataset(num_shards=max(1, loaded.num_rows // 10_000)) if streaming else loaded
        )
    return datasets.load_dataset(source.dataset, source.name, split=source.split, streaming=streaming)


def _syntax(columns: list[str], where: str):
    syntax = next(((key, parse) for key, parse in SYNTAXES if key in columns), None)
    if syntax is None:
        raise ConfigError(
            f"columns: {where} has none of the columns messages, conversations, instruction "
            f"(columns: {columns}); map yours with columns: {{messages: <column>}}"
        )
    return syntax


def _renamed(dataset, source: SourceConfig, columns: list[str]):
    renames = {theirs: ours for ours, theirs in source.columns.items() if theirs != ours}
    missing = [theirs for theirs in renames if theirs not in columns]
    if missing:
        raise ConfigError(f"columns: {source.where} has no column {missing[0]!r} (columns: {columns})")
    return (dataset.rename_columns(renames) if renames else dataset), [renames.get(c, c) for c in columns]


def _image_column(columns: list[str]) -> str | None:
    return next((c for c in ("images", "image") if c in columns), None)


def _to_array(value: Any, root: Path | None) -> np.ndarray:
    if isinstance(value, Image.Image):
        return np.asarray(value.convert("RGB"))
    if isinstance(value, dict) and value.get("bytes"):
        return np.asarray(Image.open(io.BytesIO(value["bytes"])).convert("RGB"))
    path = value.get("path") if isinstance(value, dict) else value
    return load_image(Path(root) / path if root is not None else Path(path))


def _images(dataset, column: str | None, root: Path | None, index: int) -> list[np.ndarray]:
    if column is None:
        return []
    value = dataset[index][column]
    values = [] if value is None else value if isinstance(value, list) else [value]
    return [_to_array(v, root) for v in values]


def read_hf(
    source: SourceConfig, kind: SampleKind, bad: BadSampleCounter, counts: Counter
) -> ImageConversations:
    dataset = load_hf(source)
    dataset, _ = _renamed(dataset, source, dataset.column_names)
    syntax = _syntax(dataset.column_names, source.where)
    image_column = _image_column(dataset.column_names)
    texts = dataset.select_columns([c for c in dataset.column_names if c != image_column])
    num_images = _image_counts(dataset, image_column)
    keep, messages = [], []
    for index, row in enumerate(texts):
        try:
            turns = syntax[1](row)
            check_placeholders(turns, num_images[index])
        except BadSampleError as error:
            handle_bad_sample(error.located(source.where, f"row {index}"), source.on_bad_sample, bad)
            continue
        keep.append(index)
        messages.append(turns)
    kept = dataset if len(keep) == len(dataset) else dataset.select(keep)
    root = Path(source.image_root) if source.image_root is not None else None
    return ImageConversations(
        messages, [num_images[i] for i in keep], partial(_images, kept, image_column, root)
    )


def _image_counts(dataset, column: str | None) -> list[int]:
    """Images per row, from the Arrow column (nothing is decoded)."""
    if column is None:
        return [0] * len(dataset)
    import pyarrow.compute as pc

    values = dataset.select_columns([column]).with_format("arrow")[:].column(column)
    if hasattr(values.type, "value_type"):  # a list column
        return pc.fill_null(pc.list_value_length(values), 0).to_pylist()
    return [int(v) for v in pc.is_valid(values).to_pylist()]


@dataclass
class HFStream(SampleStream):
    """``chat`` / ``image-chat`` rows of a streaming ``datasets.IterableDataset`` (its shards are its
    files): samples ``{"messages", "images": [uint8 [H, W, 3]], "where"}``, checked as they come."""

    dataset: Any = None
    syntax: Any = None
    image_column: str | None = None
    image_root: Path | None = None
    where: str = ""
    text_only: bool = False

    def shard_samples(self, shard: int):
        rows = self.dataset.shard(num_shards=len(self.shards), index=shard)
        for index, row in enumerate(rows):
            yield f"shard {shard} row {index}", row

    def decode(self, raw) -> dict[str, Any] | None:
        label, row = raw
        try:
            value = row.get(self.image_column) if self.image_column else None
            values = [] if value is None else value if isinstance(value, list) else [value]
            if values and self.text_only:
                raise ConfigError(f"{self.where}: {label} has images, but this task reads text-only chats")
            messages = self.syntax[1](row)
            check_placeholders(messages, len(values))
            images = [_to_array(v, self.image_root) for v in values]
        except BadSampleError as error:
            self._bad(error.located(self.where, label))
            return None
        return {"messages": messages, "images": images, "where": f"{self.where}, {label}"}


def read_hf_stream(source: SourceConfig, kind: SampleKind, prefix: str, counts: Counter) -> HFStream:
    dataset = load_hf(source)
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    dataset, columns = _renamed(dataset, source, columns)
    return HFStream(
        list(range(dataset.num_shards)),
        **stream_settings(source, prefix, counts),
        dataset=dataset,
        syntax=_syntax(columns, source.where),
        image_column=_image_column(columns),
        image_root=Path(source.image_root) if source.image_root is not None else None,
        where=source.where,
        text_only=kind == "chat",
    )
