"""Keep the top fraction of a scored pool, with DuckDB over the score Parquet files (nothing is loaded into
Python whole).

The scored pairs (status ``ok``) are ordered by score, highest first, ties broken by ``uid`` ascending;
``keep: f`` keeps the first ``ceil(f * N)`` of the ``N`` scored pairs (DataComp's ``--fraction``), or
``threshold: t`` every pair scoring at least ``t``. Written to ``out/``: ``kept.parquet`` (``uid``,
``score``, in that order), ``kept_uids.txt`` (one uid per line, sorted as DataComp's uid files are) and
``selection.json`` (the counts, the fraction, and the score of the last kept pair: the threshold that
reproduces the selection).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mmfactory.config import ConfigError


def select_top(
    scores: str | Path, out: str | Path, keep: float | None = None, threshold: float | None = None
) -> dict:
    import duckdb

    if (keep is None) == (threshold is None):
        raise ConfigError("select: give exactly one of --keep (a fraction) and --threshold (a score)")
    if keep is not None and not 0 < keep <= 1:
        raise ConfigError(f"--keep: a fraction in (0, 1], got {keep}")
    parts = sorted(Path(scores).glob("*/part-*.parquet"))
    if not parts:
        raise ConfigError(
            f"--scores: no {scores}/*/part-*.parquet files (run `mmfactory filter score` first)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    db = duckdb.connect()
    files = [str(p) for p in parts]
    listed = "[" + ", ".join(_quoted(f) for f in files) + "]"
    db.execute(f"CREATE VIEW scored AS SELECT uid, score FROM read_parquet({listed}) WHERE status = 'ok'")
    total, bad = db.execute(
        "SELECT count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE status <> 'ok') "
        f"FROM read_parquet({listed})"
    ).fetchone()
    if keep is not None:
        count = math.ceil(keep * total)
        query = f"SELECT uid, score FROM scored ORDER BY score DESC, uid ASC LIMIT {count}"
    else:
        query = (
            f"SELECT uid, score FROM scored WHERE score >= {float(threshold)!r} ORDER BY score DESC, uid ASC"
        )
    kept_file, uid_file = _quoted(str(out / "kept.parquet")), _quoted(str(out / "kept_uids.txt"))
    db.execute(f"COPY ({query}) TO {kept_file} (FORMAT parquet)")
    kept, last = db.execute(f"SELECT count(*), min(score) FROM read_parquet({kept_file})").fetchone()
    db.execute(f"COPY (SELECT uid FROM read_parquet({kept_file}) ORDER BY uid) TO {uid_file} (HEADER false)")
    summary = {
        "scored": total,
        "bad": bad,
        "kept": kept,
        "fraction": kept / total if total else 0.0,
        "threshold": last,
    }
    (out / "selection.json").write_text(json.dumps(summary, indent=1))
    return summary


def _quoted(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"
