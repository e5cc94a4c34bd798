"""Streaming sources: samples read shard by shard as training goes, never all up front.

A streaming source (``streaming: true``: ``format: webdataset``, read with the ``webdataset`` library:
brace expansion, ``.tar`` and ``.tar.gz``, members held in memory, never written to disk; or ``format:
hf``, a ``datasets`` streaming ``IterableDataset`` whose shards are its files) is an endless,
deterministic stream *per process*:

* **Shards split across processes.** Pass ``e`` (0, 1, ...) orders the shards by a permutation seeded
  with ``seed + e``; process ``r`` of ``W`` reads shards ``r, r + W, ...`` of that order, so within one
  pass no sample is read by two processes and none is lost. Fewer shards than processes is refused.
* **Shuffling.** Samples pass through a shuffle buffer of ``shuffle_buffer`` samples (0: file order),
  seeded by ``(seed, e, r)``.
* **Uneven shards: pad by wrapping.** A process that reaches the end of its shards starts its next pass;
  the stream never ends, so every process takes exactly the stage's steps and none waits on another. A
  process with fewer samples sees its samples more often; ``num_samples`` (the source's size, which a
  stream cannot know before reading it, as open_clip's ``--train-num-samples``) sets the length of an
  epoch when the stage trains for ``epochs``.
* **Exact resume.** Step ``s`` of a process is positions ``[s * A * B, (s + 1) * A * B)`` of its stream
  (``B`` batch size, ``A`` accumulation steps), so 1x8 == 8x1 holds within a process and a resumed run
  replays the stream up to its position (shard order and shuffle buffer are seeded) and continues at
  the exact sample. A position counts good training items only, so the replay decodes (and tokenises)
  what it skips, to know which samples are bad: resuming late in a long stream costs that re-read.
  Results depend on the process count ``W``.
* **Bad samples** are met while training: under ``skip`` each is counted (``{split}/bad_{reason}``) and
  the first five are printed with shard and key; under ``error`` the run stops naming them. Streams are
  decoded in the training process (``train.num_workers`` does not apply to them).
"""

from __future__ import annotations

import glob
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from mmfactory.config import ConfigError
from mmfactory.data.media import load_image
from mmfactory.data.policy import BadReason, BadSampleCounter, BadSampleError, DataError, handle_bad_sample
from mmfactory.data.readers.webdataset import IMAGE_EXTENSIONS

MAX_EXAMPLES = 5


def expand_shards(pattern: str) -> list[str]:
    """Shard paths of ``pattern``: brace expansion (``shard-{000..009}.tar``), then globbing, sorted."""
    import braceexpand

    shards: list[str] = []
    for path in braceexpand.braceexpand(pattern):
        shards += sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if not shards:
        raise BadSampleError("no shard matches", reason=BadReason.MISSING_FILE, file=pattern)
    return shards


@dataclass
class SampleStream:
    """An endless per-process stream over ``shards`` (module docstring). Subclasses read one shard's raw
    samples (:meth:`shard_samples`) and decode one (:meth:`decode`: a sample, or None for a bad one)."""

    shards: list
    seed: int = 0
    shuffle_buffer: int = 0
    num_samples: int | None = None
    on_bad_sample: str = "error"
    counts: Counter | None = None
    prefix: str = "train"

    def __post_init__(self) -> None:
        self.bad = BadSampleCounter(max_examples=MAX_EXAMPLES)

    def shard_samples(self, shard) -> Iterator[Any]:
        raise NotImplementedError

    def decode(self, raw: Any) -> dict[str, Any] | None:
        raise NotImplementedError

    def _bad(self, error: BadSampleError) -> None:
        handle_bad_sample(error, self.on_bad_sample, self.bad)
        if self.counts is not None:
            self.counts[f"{self.prefix}/bad_{error.reason.value}"] += 1
        if self.bad.total <= MAX_EXAMPLES:
            print(f"[data] skipped {error}", file=sys.stderr, flush=True)

    def raw_pass(self, epoch: int, rank: int, world_size: int) -> Iterator[Any]:
        """This process's raw samples of pass ``epoch``, through the seeded shuffle buffer."""
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.shards))
        mine = [self.shards[i] for i in order[rank::world_size]]
        rng = np.random.default_rng([self.seed, epoch, rank])
        buffer: list[Any] = []
        for shard in mine:
            for raw in self.shard_samples(shard):
                if self.shuffle_buffer <= 1:
                    yield raw
                    continue
                buffer.append(raw)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def samples(self, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """This process's endless stream of good samples, pass after pass (module docstring)."""
        if len(self.shards) < world_size:
            raise ConfigError(
                f"{len(self.shards)} shards for {world_size} processes: a streaming source needs at least "
                "one shard per process (write the data into more shards or files)"
            )
        epoch = 0
        while True:
            empty = True
            for raw in self.raw_pass(epoch, rank, world_size):
                sample = self.decode(raw)
                if sample is not None:
                    empty = False
                    yield sample
            if empty:
                raise DataError(f"process {rank} of {world_size} found no good sample in its shards")
            epoch += 1


@dataclass
class ImageTextStream(SampleStream):
    """An ``image-text`` webdataset stream: samples ``{"key", "captions": [text], "image": uint8 [H, W, 3]}``
    from shards of ``{key}.{png|jpg|jpeg|webp}`` + ``{key}.txt`` (+ ``{key}.json``, whose ``id`` names it)."""

    # -- raw samples: bytes only, nothing decoded ---------------------------------------------------
    def shard_samples(self, shard: str) -> Iterator[dict[str, Any]]:
        import webdataset.tariterators as wds

        def handler(error: Exception) -> bool:
            self._bad(
                BadSampleError(
                    f"unreadable tar, rest of shard lost: {error.args[0]}",
                    reason=BadReason.CORRUPT_ARCHIVE,
                    file=shard,
                    record="archive",
                )
            )
            return False  # the rest of a broken tar stream cannot be trusted

        if not Path(shard).is_file():
            self._bad(BadSampleError("shard not found", reason=BadReason.MISSING_FILE, file=shard))
            return
        with open(shard, "rb") as stream:
            files = wds.tar_file_expander([{"url": shard, "stream": stream}], handler=handler)
            yield from wds.group_by_keys(files, handler=handler)

    # -- decoded samples ----------------------------------------------------------------------------
    def decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        key = raw["__key__"]
        try:
            image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if image is None or "txt" not in raw:
                missing = "an image member (png/jpg/jpeg/webp)" if image is None else f"{key}.txt"
                raise BadSampleError(f"no {missing}", reason=BadReason.MISSING_FILE)
            try:
                text = raw["txt"].decode("utf-8")
            except UnicodeDecodeError as error:
                raise BadSampleError(f"{key}.txt is not UTF-8", reason=BadReason.INVALID_RECORD) from error
            if not text.strip():
                raise BadSampleError(f"{key}.txt is empty", reason=BadReason.EMPTY_TEXT)
            name = key
            if "json" in raw:
                try:
                    meta = json.loads(raw["json"])
                except ValueError as error:
                    raise BadSampleError(
                        f"{key}.json: malformed JSON", reason=BadReason.MALFORMED_JSON
                    ) from error
                name = meta.get("id", key) if isinstance(meta, dict) else key
            return {"key": name, "captions": [text], "image": load_image(image)}
        except BadSampleError as error:
            self._bad(error.located(raw["__url__"], f"sample {key!r}"))
            return None


class StreamBatches(IterableDataset):
    """This process's micro-batches of a stream from a global step on: ``grad_accum`` lists of
    ``batch_size`` items per step. Item ``p`` is ``item(sample, rng_p)`` with ``rng_p`` seeded by
    ``(seed, rank, p)``; a sample whose item is None (e.g. truncation left no reply token) takes no
    position. A resumed run replays the stream up to position ``start_step * grad_accum * batch_size``,
    making (and dropping) the items on the way, so it draws exactly what the uninterrupted run drew."""

    def __init__(
        self,
        stream: SampleStream,
        item: Callable[[dict, np.random.Generator], Any],
        batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        start_step: int,
    ):
        self.stream, self.item = stream, item
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start = start_step * batch_size * grad_accum

    def _items(self) -> Iterator[Any]:
        position = 0
        for sample in self.stream.samples(self.rank, self.world_size):
            item = self.item(sample, np.random.default_rng([self.stream.seed, self.rank, position]))
            if item is None:
                continue
            if position >= self.start:
                yield item
            position += 1

    def __iter__(self) -> Iterator[list]:
        items = self._items()
        while True:
            yield [next(items) for _ in range(self.batch_size)]


@dataclass
class TrainStream:
    """What a task's ``train_dataset`` returns for a streaming source: the stream and the function that
    makes a training item of a sample (``item(sample, rng)``); the training loop batches it."""

    stream: SampleStream
    item: Callable[[dict, np.random.Generator], Any | None]

    def steps_per_epoch(self, global_batch: int) -> int:
        if self.stream.num_samples is None:
            raise ConfigError(
                "train.epochs: a streaming source does not know its length; set train.max_steps, or the "
                "source's num_samples"
            )
        steps = self.stream.num_samples // global_batch
        if steps == 0:
            raise ConfigError(
                f"num_samples: {self.stream.num_samples} is less than one global batch of {global_batch}"
            )
        return steps

    def batches(
        self, batch_size: int, grad_accum: int, rank: int, world_size: int, start_step: int
    ) -> StreamBatches:
        return StreamBatches(self.stream, self.item, batch_size, grad_accum, rank, world_size, start_step)


def stream_settings(source, prefix: str, counts: Counter) -> dict[str, Any]:
    """The :class:`SampleStream` settings a source gives (its shards aside)."""
    return {
        "seed": source.seed,
        "shuffle_buffer": source.shuffle_buffer,
        "num_samples": source.num_samples,
        "on_bad_sample": source.on_bad_sample,
        "counts": counts,
        "prefix": prefix,
    }


def read_webdataset_stream(source, prefix: str, counts: Counter) -> ImageTextStream:
    return ImageTextStream(expand_shards(source.path), **stream_settings(source, prefix, counts))
