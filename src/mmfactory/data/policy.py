"""The bad-input policy: raise on a bad sample, or skip it and count it by reason. Never drop silently.

Every reader takes ``on_bad_sample`` (``"error"``, the default, or ``"skip"``) and a
:class:`BadSampleCounter`, and routes each bad record through :func:`handle_bad_sample`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Literal, get_args

BadSamplePolicy = Literal["error", "skip"]


class BadReason(StrEnum):
    """Why a sample is bad; the keys of :meth:`BadSampleCounter.summary`."""

    MISSING_FILE = "missing_file"
    CORRUPT_IMAGE = "corrupt_image"
    CORRUPT_AUDIO = "corrupt_audio"
    MISSING_AUDIO = "missing_audio"  # an audio-visual sample whose video has no audio track
    SILENT_AUDIO = "silent_audio"
    CORRUPT_VIDEO = "corrupt_video"
    CORRUPT_ARCHIVE = "corrupt_archive"
    WRONG_SAMPLE_RATE = "wrong_sample_rate"
    MALFORMED_JSON = "malformed_json"
    MALFORMED_CSV = "malformed_csv"
    INVALID_RECORD = "invalid_record"
    EMPTY_TEXT = "empty_text"
    PLACEHOLDER_MISMATCH = "placeholder_mismatch"
    INVALID_RANKS = "invalid_ranks"


class DataError(ValueError):
    """The data as a whole is unusable (too many bad records); the message says which source and why."""


class BadSampleError(ValueError):
    """A bad sample: ``"{file}, {record}: {problem}"``.

    Media decoders raise it with ``file`` = the media file and no record; readers re-raise it
    :meth:`located` in the annotation file and record that referenced the media.
    """

    def __init__(
        self, problem: str, *, reason: BadReason, file: str | Path | None = None, record: str | None = None
    ) -> None:
        self.problem, self.reason, self.file, self.record = problem, BadReason(reason), file, record
        where = ", ".join(str(part) for part in (file, record) if part is not None)
        super().__init__(f"{where}: {problem}" if where else problem)

    def __reduce__(self):  # picklable although ``reason`` is keyword-only
        rebuild = partial(BadSampleError, reason=self.reason, file=self.file, record=self.record)
        return rebuild, (self.problem,)

    def located(self, file: str | Path, record: str) -> BadSampleError:
        """The same error placed at ``record`` of ``file``; a media path it named moves into the problem."""
        problem = str(self) if self.file is not None else self.problem
        return BadSampleError(problem, reason=self.reason, file=file, record=record)


@dataclass
class BadSampleCounter:
    """Skipped samples counted by reason, with the first ``max_examples`` locations of each reason."""

    max_examples: int = 3
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, error: BadSampleError) -> None:
        reason = str(error.reason)
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(", ".join(str(part) for part in (error.file, error.record) if part is not None))

    def merge(self, *others: BadSampleCounter) -> BadSampleCounter:
        """Add the counts and examples of ``others`` into this counter (in place); returns it."""
        for other in others:
            self.counts.update(other.counts)
            for reason, examples in other.examples.items():
                kept = self.examples.setdefault(reason, [])
                kept.extend(examples[: max(0, self.max_examples - len(kept))])
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        """``{reason: count}`` sorted by reason, for logs and run records."""
        return dict(sorted(self.counts.items()))

    def report(self, examples: int = 1) -> str:
        """One line, e.g. ``skipped 2 bad samples: missing_file 2 (e.g. a.jsonl, line 3)``, with up to
        ``examples`` locations per reason."""
        if not self.counts:
            return "skipped 0 bad samples"
        parts = [
            f"{reason} {count} (e.g. {'; '.join(self.examples[reason][:examples])})"
            for reason, count in self.summary().items()
        ]
        return f"skipped {self.total} bad sample{'s' * (self.total != 1)}: " + "; ".join(parts)


def check_policy(on_bad_sample: str) -> BadSamplePolicy:
    """``on_bad_sample`` itself, or ValueError when it is not one of ``error``, ``skip``."""
    if on_bad_sample not in get_args(BadSamplePolicy):
        raise ValueError(f"on_bad_sample must be one of {get_args(BadSamplePolicy)}, got {on_bad_sample!r}")
    return on_bad_sample  # type: ignore[return-value]


def handle_bad_sample(
    error: BadSampleError, on_bad_sample: BadSamplePolicy, counter: BadSampleCounter
) -> None:
    """Raise ``error`` under ``"error"``; count it in ``counter`` under ``"skip"``."""
    if check_policy(on_bad_sample) == "error":
        raise error
    counter.add(error)
