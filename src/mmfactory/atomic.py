"""Files and folders written so that a reader sees the old one or the whole new one, never half."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)


def fsync_tree(path: Path) -> None:
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


def atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of ``final``; pass it to :func:`commit_dir` when complete."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` and rename it to ``final`` (replacing an older ``final``)."""
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
