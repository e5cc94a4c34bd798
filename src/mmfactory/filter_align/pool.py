"""A pool of image-text pairs to score, as named shards of ``{"uid", "image", "text"}`` items.

``image`` is what the source holds (uint8 ``[H, W, 3]`` for the world, encoded bytes for a shard);
:func:`decode_item` turns it into pixels or a bad-sample reason. A pool spec is

* ``world:N`` or ``world:N:BAD``: the world's web-like pool of N pairs (a known ``BAD`` share misaligned,
  default 0.5), cut into shards of ``shard_size`` pairs (``world-00000`` ...);
* a webdataset shard, glob or brace pattern (``pool-{000..099}.tar.gz``): each file one shard, a sample's
  ``uid`` its ``{key}.json`` ``id`` or else its key;
* JSONL or Parquet files (``pool-*.parquet``, ``pairs.jsonl``), each one shard, a row ``{"uid" (or "id"),
  "image", "text" (or "caption")}`` whose ``image`` is encoded bytes, a Hugging Face image cell
  (``{"bytes", "path"}``) or a path (relative to the file's folder). A row without a uid is
  ``{file stem}-{row}``; a line that is not JSON is a ``malformed_json`` row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmfactory.config import ConfigError
from mmfactory.data.media import load_image
from mmfactory.data.policy import BadReason, BadSampleError
from mmfactory.data.streaming import IMAGE_EXTENSIONS, ImageTextStream, expand_shards


@dataclass(frozen=True)
class Shard:
    name: str
    spec: str  # a file, or "world:N:BAD:lo:hi"


def pool_shards(spec: str, shard_size: int = 1000) -> list[Shard]:
    """The pool's shards, in a fixed order (module docstring)."""
    if spec.startswith("world:"):
        parts = spec.split(":")
        try:
            n, bad = int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.5
        except (IndexError, ValueError):
            raise ConfigError(f"pool: {spec!r}; expected world:N or world:N:BAD_FRACTION") from None
        return [
            Shard(f"world-{k:05d}", f"world:{n}:{bad}:{lo}:{min(lo + shard_size, n)}")
            for k, lo in enumerate(range(0, n, shard_size))
        ]
    files = expand_shards(spec)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"pool: shard {missing[0]!r} does not exist")
    return [Shard(Path(f).name.split(".")[0], f) for f in files]


_WORLD_POOLS: dict[tuple[int, float], list[dict]] = {}


def world_pool(n: int, bad: float) -> list[dict]:
    """The world's web pool of ``n`` pairs (built once per process) and its hidden truth in ``aligned``."""
    if (n, bad) not in _WORLD_POOLS:
        from mmfactory.data.world_source import world_web_pool

        _WORLD_POOLS[(n, bad)] = world_web_pool(n, bad)
    return _WORLD_POOLS[(n, bad)]


def shard_items(shard: Shard) -> Iterator[dict[str, Any]]:
    """The shard's items ``{"uid", "image", "text"}`` in file order; a member that cannot become an item
    (no image, no caption) is an item with ``"bad": reason`` so it is counted, never dropped."""
    if shard.spec.startswith("world:"):
        _, n, bad, lo, hi = shard.spec.split(":")
        yield from world_pool(int(n), float(bad))[int(lo) : int(hi)]
        return
    if shard.spec.endswith((".jsonl", ".parquet")):
        yield from _table_items(Path(shard.spec))
        return
    # The streaming reader's member grouping (a broken tar raises naming the shard).
    for raw in ImageTextStream([shard.spec]).shard_samples(shard.spec):
        image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        uid = raw["__key__"]
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
                uid = str(meta.get("uid", meta.get("id", uid))) if isinstance(meta, dict) else uid
            except ValueError:
                pass
        text = raw.get("txt", b"").decode("utf-8", errors="replace")
        item = {"uid": uid, "image": image, "text": text}
        if image is None or not text.strip():
            item["bad"] = BadReason.MISSING_FILE.value if image is None else BadReason.EMPTY_TEXT.value
        yield item


def _table_rows(path: Path) -> Iterator[dict | None]:
    """The rows of a JSONL (None for a line that is not a JSON object) or Parquet file, in file order."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                yield row if isinstance(row, dict) else None


def _table_items(path: Path) -> Iterator[dict[str, Any]]:
    for index, row in enumerate(_table_rows(path)):
        if row is None:
            yield {
                "uid": f"{path.stem}-{index}",
                "image": None,
                "text": "",
                "bad": BadReason.MALFORMED_JSON.value,
            }
            continue
        uid = str(row.get("uid", row.get("id", f"{path.stem}-{index}")))
        image, text = row.get("image"), row.get("text", row.get("caption")) or ""
        if isinstance(image, dict):  # a Hugging Face Image cell
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str):
            image = str(path.parent / image)
        item = {"uid": uid, "image": image, "text": str(text)}
        if image is None or not str(text).strip():
            item["bad"] = BadReason.MISSING_FILE.value if image is None else BadReason.EMPTY_TEXT.value
        yield item


def decode_item(item: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """``(pixels, "ok")`` or ``(None, reason)`` for a pool item."""
    if "bad" in item:
        return None, item["bad"]
    image = item["image"]
    if isinstance(image, np.ndarray):
        return image, "ok"
    try:
        return load_image(image), "ok"
    except BadSampleError as error:
        return None, error.reason.value
