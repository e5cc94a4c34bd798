"""What a finished stage was built from, so that a rerun never reuses a stage whose inputs changed.

When a stage finishes, its ``DONE`` records ``fingerprint`` (the SHA-256 over its ``final/`` files, hashed
once, when they are written) and ``lineage``: the fingerprints of the earlier stages it names anywhere in
its configuration (``init_from``, a teacher, a reference model, a drafter, earlier rounds) and the size and
modification time of the data files it reads. The stage's own configuration is checked by the runner
against its ``config.yaml``. A rerun compares the recorded lineage with the current one: a retrained or
changed upstream stage, or an edited data file, makes the stage stale, and it runs again (or, with
``--no-rerun-stale``, the run stops saying so). Nothing is re-hashed on a rerun.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mmfactory.atomic import file_sha256
from mmfactory.config import StageConfig, to_dict
from mmfactory.model_card import MODEL_CARD

FILE_KEYS = ("path", "labels")  # source keys that name data files


def dir_fingerprint(folder: Path) -> str:
    """SHA-256 over the relative names and SHA-256 of every file under ``folder`` but its model card
    (documentation, not the model)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MODEL_CARD):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list | tuple):
        return [s for value in node for s in _strings(value)]
    return []


def dependencies(stage: StageConfig, earlier: list[str]) -> list[str]:
    """The earlier stages ``stage`` names anywhere in its configuration (as ``STAGE`` or as a path
    ``STAGE/...`` inside its output), in recipe order."""
    named = {s.partition("/")[0] for s in _strings(to_dict(stage))} - {stage.name}
    return [name for name in earlier if name in named]


def _data_files(node: Any) -> dict[str, list[int]]:
    files: dict[str, list[int]] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key in FILE_KEYS and isinstance(value, str) and Path(value).expanduser().is_file():
                stat = Path(value).expanduser().stat()
                files[value] = [stat.st_size, stat.st_mtime_ns]
            else:
                files.update(_data_files(value))
    elif isinstance(node, list):
        for value in node:
            files.update(_data_files(value))
    return files


def lineage(stage: StageConfig, fingerprints: dict[str, str]) -> dict[str, Any]:
    """``{"upstream": {stage: fingerprint}, "data_files": {path: [size, mtime_ns]}}`` of ``stage`` now;
    ``fingerprints`` holds those of the earlier stages of the run."""
    upstream = {name: fingerprints.get(name) for name in dependencies(stage, list(fingerprints))}
    return {"upstream": upstream, "data_files": _data_files(to_dict(stage.data))}


def stale_reason(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why a finished stage recorded as ``recorded`` no longer matches ``current`` (None: it does)."""
    if recorded is None:
        return "its DONE records no lineage (written by an older version)"
    for name, fingerprint in current["upstream"].items():
        if recorded["upstream"].get(name) != fingerprint:
            return f"upstream stage {name!r} changed since it ran"
    for path in sorted(set(current["data_files"]) | set(recorded["data_files"])):
        if recorded["data_files"].get(path) != current["data_files"].get(path):
            return f"data file {path} changed since it ran"
    return None
