"""What every reader shares: validated records, a map-style dataset that decodes media on access.

How bad input is handled, and why this works with a torch ``DataLoader`` (any sampler, any number of
workers, any number of ranks):

* Construction reads the annotation file in the calling process and validates every record (JSON/CSV
  syntax, fields, empty text, placeholders, ranks, media files exist). With ``check_media=True`` (the
  default) it also decodes each media file once and throws the pixels/samples away. Bad records are
  raised or skipped and counted here, so counts are exact, and identical on every rank.
* ``dataset[i]`` decodes the media of record ``i``. After a media check it cannot fail unless a file
  changed; with ``check_media=False`` (for sets too large to decode twice) a corrupt file fails here,
  and then it raises :class:`BadSampleError` naming the file and record under either policy: a
  map-style dataset cannot drop an index, and a count made in a worker process would never reach the
  counter of the main process.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mmfactory.data.media import load_image
from mmfactory.data.policy import (
    BadReason,
    BadSampleCounter,
    BadSampleError,
    BadSamplePolicy,
    check_policy,
    handle_bad_sample,
)

Fields = dict[str, Any]


@dataclass(frozen=True)
class Record:
    """One validated record: where it came from (``file``, ``label`` e.g. ``"line 3 (id 'a')"``) and
    its fields, with media as resolved :class:`~pathlib.Path` s."""

    file: Path
    label: str
    fields: Fields


class RecordDataset(Dataset):
    """Validated records; ``dataset[i]`` returns the sample dict of record ``i`` with its media decoded.

    ``decode`` maps a record's fields to the sample; it must be picklable (a module-level function or a
    ``functools.partial`` of one) for ``DataLoader`` workers. ``counter`` holds the skips of construction.
    """

    def __init__(self, records: list[Record], decode: Callable[[Fields], Fields], counter: BadSampleCounter):
        self.records, self.decode, self.counter = records, decode, counter

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Fields:
        record = self.records[index]
        try:
            return self.decode(record.fields)
        except BadSampleError as error:
            raise error.located(record.file, record.label) from error


def read_annotation_file(
    path: str | Path,
    parse: Callable[[dict[str, Any], Path], Fields],
    decode: Callable[[Fields], Fields],
    *,
    json_list: bool,
    on_bad_sample: BadSamplePolicy,
    counter: BadSampleCounter | None,
    check_media: bool,
    check: Callable[[Fields], Any] | None = None,
    base_dir: str | Path | None = None,
) -> RecordDataset:
    """Read a JSON list (``json_list``) or JSONL file into a :class:`RecordDataset`.

    ``parse(raw, base_dir)`` validates one record and returns its fields (media paths resolved against
    ``base_dir``: by default the file's folder); with ``check_media`` each record is also decoded once by
    ``check`` (default: ``decode``).
    """
    check_policy(on_bad_sample)
    path, counter = Path(path), counter if counter is not None else BadSampleCounter()
    if not path.is_file():
        raise BadSampleError("annotation file not found", reason=BadReason.MISSING_FILE, file=path)
    items = iter_json_list(path) if json_list else iter_jsonl(path, on_bad_sample, counter)
    parse_here = partial(parse, base_dir=Path(base_dir) if base_dir is not None else path.parent)
    records = collect_records(
        path, items, parse_here, (check or decode) if check_media else None, on_bad_sample, counter
    )
    return RecordDataset(records, decode, counter)


def collect_records(
    file: Path,
    items: Iterable[tuple[str, Any]],
    parse: Callable[[dict[str, Any]], Fields],
    check: Callable[[Fields], Any] | None,
    on_bad_sample: BadSamplePolicy,
    counter: BadSampleCounter,
) -> list[Record]:
    """Parse (and ``check``, e.g. decode media once) each ``(label, raw)`` item; bad ones go to the policy.

    ``parse`` and ``check`` raise :class:`BadSampleError` without a location; it is added here.
    """
    records = []
    for label, raw in items:
        label = _with_id(label, raw)
        try:
            if not isinstance(raw, dict):
                raise BadSampleError("record must be a JSON object", reason=BadReason.INVALID_RECORD)
            fields = parse(raw)
            if check is not None:
                check(fields)
        except BadSampleError as error:
            handle_bad_sample(error.located(file, label), on_bad_sample, counter)
        else:
            records.append(Record(file, label, fields))
    return records


def _with_id(label: str, raw: Any) -> str:
    ids = [raw[key] for key in ("id", "uid", "video_id") if isinstance(raw, dict) and key in raw]
    return f"{label} (id {ids[0]!r})" if ids else label


def iter_jsonl(
    file: Path, on_bad_sample: BadSamplePolicy, counter: BadSampleCounter
) -> Iterator[tuple[str, Any]]:
    """``("line N", parsed)`` for each non-blank line; a line that is not valid JSON goes to the policy."""
    with open(file, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                bad = BadSampleError(f"malformed JSON: {error}", reason=BadReason.MALFORMED_JSON)
                handle_bad_sample(bad.located(file, f"line {number}"), on_bad_sample, counter)
                continue
            yield f"line {number}", raw


def read_json_file(file: Path) -> Any:
    """The JSON value a whole file holds. A file that does not parse has no records to skip: it raises
    :class:`BadSampleError` (``malformed_json``, naming the file) under either policy."""
    try:
        return json.loads(Path(file).read_bytes())
    except ValueError as error:
        raise BadSampleError(
            f"malformed JSON: {error}", reason=BadReason.MALFORMED_JSON, file=file
        ) from error


def iter_json_list(file: Path) -> Iterator[tuple[str, Any]]:
    """``("index i", item)`` for each item of a file holding one JSON list (:func:`read_json_file`)."""
    items = read_json_file(file)
    if not isinstance(items, list):
        raise BadSampleError("expected a JSON list of records", reason=BadReason.INVALID_RECORD, file=file)
    for index, item in enumerate(items):
        yield f"index {index}", item


def require(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``raw[key]``, which must exist and be an instance of ``kind`` (a bool is not an int)."""
    if key not in raw:
        raise BadSampleError(f"missing field {key!r}", reason=BadReason.INVALID_RECORD)
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        problem = f"field {key!r} must be {expected}, got {type(value).__name__}"
        raise BadSampleError(problem, reason=BadReason.INVALID_RECORD)
    return value


def require_text(raw: Mapping[str, Any], key: str) -> str:
    """``raw[key]`` as a string that is not empty or blank."""
    text = require(raw, key, str)
    check_text(text, repr(key))
    return text


def check_text(text: str, what: str) -> None:
    if not text.strip():
        raise BadSampleError(f"{what} is empty", reason=BadReason.EMPTY_TEXT)


def media_file(base_dir: Path, relative: Any, what: str) -> Path:
    """``base_dir / relative``, which must be an existing file (record paths are relative to their file)."""
    if not isinstance(relative, str) or not relative:
        raise BadSampleError(f"{what} must be a non-empty path string", reason=BadReason.INVALID_RECORD)
    path = base_dir / relative
    if not path.is_file():
        raise BadSampleError(f"{what} file {str(path)!r} not found", reason=BadReason.MISSING_FILE)
    return path


def parse_messages(
    turns: Any, role_key: str, content_key: str, roles: Mapping[str, str], what: str
) -> list[dict[str, str]]:
    """Validate a conversation and return it as ``[{"role": user|assistant|system, "content"}]``.

    ``roles`` maps the record's role names to ours (LLaVA: ``human -> user``, ``gpt -> assistant``).
    Every turn needs non-empty content and at least one turn must be the assistant's.
    """
    if not isinstance(turns, list) or not turns:
        raise BadSampleError(f"{what!r} must be a non-empty list", reason=BadReason.INVALID_RECORD)
    messages = []
    for position, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get(role_key), str)
            or turn[role_key] not in roles
        ):
            problem = f"{what}[{position}] needs {role_key!r} in {sorted(roles)}"
            raise BadSampleError(problem, reason=BadReason.INVALID_RECORD)
        content = require(turn, content_key, str)
        check_text(content, f"{what}[{position}] {content_key!r}")
        messages.append({"role": roles[turn[role_key]], "content": content})
    if all(message["role"] != "assistant" for message in messages):
        raise BadSampleError(f"{what!r} has no assistant turn", reason=BadReason.INVALID_RECORD)
    return messages


def decode_image(fields: Fields) -> Fields:
    """``fields`` with the path under ``"image"`` decoded to ``uint8 [H, W, 3]`` (None stays None)."""
    image = fields["image"]
    return {**fields, "image": None if image is None else load_image(image)}


def iter_csv_rows(
    path: Path, columns: Sequence[str], on_bad_sample: BadSamplePolicy, counter: BadSampleCounter
) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, {column: value})`` per good CSV row (MSR-VTT captions, AudioCaps).

    Each physical line is one record (captions hold no line breaks), so an unclosed quote, a wrong
    number of fields or bytes that are not UTF-8 make that line a bad record and never swallow the lines
    after it. A header that lacks ``columns`` raises under either policy.
    """
    lines = path.read_bytes().splitlines()
    header = next(csv.reader([lines[0].decode("utf-8-sig", errors="replace")])) if lines else []
    if not set(columns) <= set(header):
        problem = f"header must name columns {tuple(columns)}, got {header}"
        raise BadSampleError(problem, reason=BadReason.MALFORMED_CSV, file=path, record="line 1")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise BadSampleError(f"not UTF-8: {error.reason}", reason=BadReason.MALFORMED_CSV) from error
            try:
                row = next(csv.reader([text], strict=True))
            except csv.Error as error:
                raise BadSampleError(f"malformed CSV: {error}", reason=BadReason.MALFORMED_CSV) from error
            if len(row) != len(header):
                problem = f"{len(row)} fields where the header has {len(header)}"
                raise BadSampleError(problem, reason=BadReason.MALFORMED_CSV)
        except BadSampleError as error:
            handle_bad_sample(error.located(path, f"line {number}"), on_bad_sample, counter)
            continue
        yield number, dict(zip(header, row, strict=True))
