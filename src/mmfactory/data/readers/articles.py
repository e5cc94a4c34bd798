"""SAG articles JSONL ``{"id", "lang": "en"|"zh", "facts"?: {str: str}, "draft"?, "reference", "input"?}``
(``input``: free text the systems get instead of the fact list, e.g. a seller's message)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfactory.data.policy import BadReason, BadSampleCounter, BadSampleError, BadSamplePolicy
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    check_text,
    read_annotation_file,
    require,
    require_text,
)

LANGUAGES = ("en", "zh")


def _parse_article(raw: dict[str, Any], base_dir: Path) -> Fields:
    lang = require(raw, "lang", str)
    if lang not in LANGUAGES:
        raise BadSampleError(
            f"'lang' must be one of {LANGUAGES}, got {lang!r}", reason=BadReason.INVALID_RECORD
        )
    facts = require(raw, "facts", dict) if "facts" in raw else {}
    for name, value in facts.items():
        if not isinstance(value, str):
            raise BadSampleError(f"facts[{name!r}] must be a string", reason=BadReason.INVALID_RECORD)
        check_text(name, "a fact name")
        check_text(value, f"facts[{name!r}]")
    return {
        "id": str(require(raw, "id", (str, int))),
        "lang": lang,
        "facts": facts,
        "draft": require_text(raw, "draft") if "draft" in raw else None,
        "reference": require_text(raw, "reference"),
        **({"input": require_text(raw, "input")} if "input" in raw else {}),
    }


def read_articles(
    path: str | Path, *, on_bad_sample: BadSamplePolicy = "error", counter: BadSampleCounter | None = None
) -> RecordDataset:
    """Samples ``{"id": str, "lang", "facts", "draft", "reference"}`` (and ``input`` when given), validated;
    ``facts`` may be absent (``{}``: a styled article alone) and so may ``draft`` (``None``: drafts come
    from the LLM)."""
    return read_annotation_file(
        path,
        _parse_article,
        dict,
        json_list=False,
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=False,
    )
