"""Atomic, pickle-free training checkpoints for exact resume.

A checkpoint folder ``step-N/`` holds:

- ``trainable.safetensors``   the trainable parameters (frozen ones are rebuilt from their source);
- ``buffers.safetensors``     the persistent buffers, which training may change without a gradient (EMA
  codebooks, running statistics);
- ``optimizer.safetensors`` + ``optimizer.json``   optimizer tensors and the rest of its state;
- ``rng-{rank}.safetensors`` + ``rng-{rank}.json`` torch / numpy / python RNG states of each process;
- ``state.json``   the global step, the scheduler state, the SHA-256 of every other file (checked by
  :func:`damage` before a resume) and anything else small.

It is written under a temporary name and renamed into place, so a crash never leaves a half checkpoint;
nothing is ever unpickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmfactory.atomic import atomic_dir, commit_dir, file_sha256
from mmfactory.train.sharded import load_full_state

STEP_DIR = re.compile(r"^step-(\d+)$")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


PARTIAL = re.compile(r"(step-\d+|final)\.(tmp|old)-\d+")


def remove_partial(directory: Path) -> None:
    """Delete leftovers of interrupted writes: the ``step-N`` / ``final`` ``.tmp-PID`` and ``.old-PID``
    folders that :func:`atomic_dir` and :func:`commit_dir` make, and nothing else."""
    for path in directory.iterdir() if directory.is_dir() else []:
        if PARTIAL.fullmatch(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete ``step-N`` folders, oldest first."""
    found = []
    for path in directory.iterdir() if directory.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


# -- optimizer ---------------------------------------------------------------------------------------


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` (its state keyed by parameter index, or by parameter name as
    :mod:`mmfactory.train.sharded` gathers it) into a flat tensor dict and JSON-able metadata."""
    tensors, scalars = {}, {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _index(index: str) -> int | str:
    return int(index) if index.isdigit() else index


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.rsplit(".", 1)  # a parameter name holds dots; a state key ("exp_avg") none
        state.setdefault(_index(index), {})[key] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(_index(index), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:  # JSON turns tuples into lists; torch expects betas as a tuple
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


# -- RNG ---------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss_next = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(py_state), gauss_next],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss_next = meta["python"]
    random.setstate((version, tuple(py_state), gauss_next))


# -- whole checkpoint --------------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng_per_rank: list[tuple[dict[str, torch.Tensor], dict]],
    extra: dict | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``directory/step-{step}`` atomically and return it (``optimizer_state``: the optimizer's
    ``state_dict()``, or the full one :mod:`mmfactory.train.sharded` gathers)."""
    final = directory / f"step-{step}"
    tmp = atomic_dir(final)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    if buffers:
        save_file({k: v.detach().contiguous().cpu() for k, v in buffers.items()}, tmp / "buffers.safetensors")
    opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    _write_json(tmp / "optimizer.json", opt_meta)
    for rank, (tensors, meta) in enumerate(rng_per_rank):
        save_file(tensors, tmp / f"rng-{rank}.safetensors")
        _write_json(tmp / f"rng-{rank}.json", meta)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
    _write_json(tmp / "state.json", {"step": step, "scheduler": sched, "files": files, **(extra or {})})
    commit_dir(tmp, final)
    return final


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``module.state_dict()`` holds (not the non-persistent ones), by qualified name."""
    return {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, sub in module.named_modules()
        for name, buffer in sub.named_buffers(recurse=False)
        if buffer is not None and name not in sub._non_persistent_buffers_set
    }


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a torn ``state.json``, a missing file, a file whose SHA-256
    differs from the one recorded when it was written), or None when it is intact."""
    try:
        files = json.loads((path / "state.json").read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"state.json unreadable ({type(error).__name__})"
    for name, expected in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if file_sha256(path / name) != expected:
            return f"{name} does not match its checksum"
    return None


def load_checkpoint(
    path: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
    sharded: bool = False,
) -> dict:
    """Restore trainable parameters, persistent buffers, optimizer, scheduler and this rank's RNG; returns
    ``state.json``. ``sharded``: ``module`` is FSDP2-sharded; each process keeps its shard of the saved
    full state (:func:`mmfactory.train.sharded.load_full_state`)."""
    saved = load_file(path / "trainable.safetensors")
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise RuntimeError(
            f"{path}: checkpoint does not match the trainable set (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); was the stage config changed since it was written?"
        )
    buffers = persistent_buffers(module)
    saved_buffers = (
        load_file(path / "buffers.safetensors") if (path / "buffers.safetensors").is_file() else {}
    )
    if saved_buffers and set(saved_buffers) != set(buffers):
        raise RuntimeError(f"{path}: checkpoint buffers do not match the model's; was the model changed?")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer_state = optimizer_from_flat(load_file(path / "optimizer.safetensors"), meta)
    with torch.no_grad():
        for name, tensor in saved_buffers.items():
            buffers[name].copy_(tensor)
        if sharded:
            load_full_state(module, optimizer, saved, optimizer_state)
        else:
            for name, tensor in saved.items():
                params[name].copy_(tensor)
            optimizer.load_state_dict(optimizer_state)
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        raise RuntimeError(
            f"{path}: no RNG state for process {rank}: resume with the same number of processes"
        )
    set_rng_state(load_file(rng_file), json.loads((path / f"rng-{rank}.json").read_text()))
    return state
