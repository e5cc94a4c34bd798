"""Model-made data (teacher top-k log-probs, drafts, sampled pairs) prepared once, before a stage trains.

An *artifact* is a folder of files plus ``fingerprint.json``: a JSON object saying what the files were made
from (a teacher's fingerprint, ``k``, the data's config and digest, the tokenizer's vocabulary hash...).
:func:`prepare_artifact` is the one way a task's ``prepare`` step writes one::

    folder = prepare_artifact(accelerator, ctx.artifact("teacher_topk"), fingerprint, build, total=len(data))

* an artifact whose recorded fingerprint equals ``fingerprint`` is reused as it is;
* one whose fingerprint differs is refused (:class:`ArtifactMismatch`, naming the fields that differ),
  never silently rebuilt or read: delete the folder, or use another ``--output``;
* otherwise the main process builds it with a progress bar into a temporary sibling ``.NAME.tmp-PID``,
  writes ``fingerprint.json`` last and renames the folder into place; a build that fails (or is killed)
  leaves at most a temporary folder, which nothing reads and the next build removes. The other processes
  wait at a barrier and then read what the main process wrote: they never write.

Fingerprints follow the runner's scheme for stage outputs (:mod:`mmfactory.lineage`): an earlier stage is
named by the SHA-256 its ``DONE`` records (:meth:`mmfactory.tasks.base.StageContext.fingerprint`), any other
folder by the names, sizes and modification times of its files (:func:`folder_stamp`, nothing re-hashed).
Building never moves the process's global random state, so training after a reused artifact is the same as
after a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmfactory.atomic import commit_dir, write_atomic
from mmfactory.config import ConfigError

FINGERPRINT_FILE = "fingerprint.json"
SHOWN_CHARS = 48  # values longer than this are named, not shown, in a refusal


class ArtifactMismatch(ConfigError):
    """An artifact folder holds data made from other inputs than the stage's."""


def _canonical(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """``fingerprint`` as it reads back from JSON (tuples become lists), so recorded and current compare."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, ensure_ascii=False))


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``fingerprint`` (one string standing for all its fields)."""
    text = json.dumps(_canonical(fingerprint), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def folder_stamp(folder: Path) -> str:
    """SHA-256 over the relative name, size and modification time of every file under ``folder`` (or of the
    file ``folder``): changes when a file is rewritten, costs no reading of the files."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        name = path.name if path == folder else path.relative_to(folder).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def recorded_fingerprint(folder: Path) -> dict[str, Any] | None:
    """The fingerprint a complete artifact in ``folder`` records; None when there is no artifact."""
    path = Path(folder) / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _describe(name: str, recorded: Any, current: Any) -> str:
    texts = [json.dumps(v, ensure_ascii=False) for v in (recorded, current)]
    if max(len(t) for t in texts) > SHOWN_CHARS:
        return name
    return f"{name} ({texts[0]} there, {texts[1]} now)"


def check_artifact(folder: Path, fingerprint: dict[str, Any], fix: str | None = None) -> bool:
    """True when ``folder`` holds a complete artifact made from ``fingerprint``, False when it holds none.

    Raises :class:`ArtifactMismatch` when it holds one made from other inputs, or something that is no
    complete artifact; ``fix`` replaces the default advice (delete the folder or use another ``--output``).
    """
    folder = Path(folder)
    fix = fix or f"delete {folder} to prepare it again, or use another --output"
    if not folder.exists():
        return False
    recorded = recorded_fingerprint(folder)
    if recorded is None:
        raise ArtifactMismatch(
            f"{folder} exists but records no {FINGERPRINT_FILE} (written by an older version or by something "
            f"else), so what it was made from is unknown: {fix}"
        )
    current = _canonical(fingerprint)
    if recorded == current:
        return True
    differ = [
        _describe(name, recorded.get(name), current.get(name))
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name) != current.get(name)
    ]
    raise ArtifactMismatch(f"{folder} was prepared from another {', '.join(differ)}: {fix}")


def remove_partial(folder: Path) -> None:
    """Delete the temporary folders that builds of ``folder`` left when they were killed."""
    folder = Path(folder)
    for path in folder.parent.glob(f".{folder.name}.tmp-*") if folder.parent.is_dir() else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def build_artifact(
    folder: Path,
    fingerprint: dict[str, Any],
    build: Callable[[Path, tqdm], None],
    total: int | None = None,
    desc: str | None = None,
) -> None:
    """Build the artifact ``folder`` on this process: ``build(tmp, bar)`` writes its files into the empty
    folder ``tmp`` and advances the progress ``bar`` (of ``total`` steps); the fingerprint is written last,
    then ``tmp`` is renamed to ``folder``. On failure nothing is left. The global RNG state is restored."""
    folder = Path(folder)
    remove_partial(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with (
            torch.random.fork_rng(devices=devices),
            tqdm(total=total, desc=desc or folder.name, dynamic_ncols=True, mininterval=1) as bar,
        ):
            build(tmp, bar)
        write_atomic(
            tmp / FINGERPRINT_FILE, json.dumps(_canonical(fingerprint), indent=1, ensure_ascii=False)
        )
        commit_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_artifact(
    accelerator,
    folder: Path,
    fingerprint: dict[str, Any],
    build: Callable[[Path, tqdm], None],
    total: int | None = None,
    desc: str | None = None,
    fix: str | None = None,
) -> Path:
    """``folder``, holding the artifact made from ``fingerprint``, on every process (module docstring).

    Args:
        accelerator: anything with ``is_main_process`` and ``wait_for_everyone()`` (an ``Accelerator``).
        folder: where the artifact lives (usually ``ctx.artifact(NAME)``).
        fingerprint: JSON-serialisable fields naming what the artifact is made from.
        build: ``build(tmp, bar)`` writes the files into ``tmp``; called on the main process only, and only
            when ``folder`` holds no artifact.
        total, desc: the progress bar's length and label.
        fix: the advice of a refusal (see :func:`check_artifact`).
    """
    folder = Path(folder)
    # Every process checks first: a mismatch is refused everywhere before anyone waits at the barrier.
    ready = check_artifact(folder, fingerprint, fix)
    if not ready and accelerator.is_main_process:
        build_artifact(folder, fingerprint, build, total, desc)
    accelerator.wait_for_everyone()
    if not check_artifact(folder, fingerprint, fix):
        raise FileNotFoundError(
            f"{folder}: the main process prepared no artifact there (do all processes share this folder?)"
        )
    return folder
