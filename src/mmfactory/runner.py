"""Run a recipe's stages in order into ``OUTPUT/<stage>/``; skip finished stages, resume interrupted ones.

Each stage folder holds ``config.yaml`` (the resolved stage), ``metrics.jsonl``, ``tensorboard/``,
checkpoints ``step-N/``, the stage's model in ``final/`` and, last, the ``DONE`` marker with its summary.
``OUTPUT/results.json`` collects ``{"recipe", "stages", "metrics"}`` and a table is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

from mmfactory.artifacts import recorded_fingerprint
from mmfactory.atomic import write_atomic
from mmfactory.config import ConfigError, Recipe, StageConfig, from_dict, to_dict
from mmfactory.data.sources import check_source_paths, stage_sources
from mmfactory.environment import environment
from mmfactory.lineage import dir_fingerprint, stale_reason
from mmfactory.lineage import lineage as stage_lineage
from mmfactory.model_card import MODEL_CARD, model_card
from mmfactory.models.hub import not_a_model_source, resolve_model_folder
from mmfactory.tasks import build_task, validate_stage
from mmfactory.tasks.base import StageContext
from mmfactory.train import checkpoint as ckpt
from mmfactory.train.loop import train_stage
from mmfactory.train.trackers import check_installed


class StageConfigChanged(ConfigError):
    """A stage folder holds work done under a different configuration."""


def _stage_yaml(stage: StageConfig) -> str:
    """The stage's config as saved in its folder; ``enabled`` is left out (a stage that runs has it on)."""
    config = {k: v for k, v in to_dict(stage).items() if k != "enabled"}
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _saved_config_as_now(saved: str, now: str) -> str | None:
    """A saved ``config.yaml`` re-read and written as this version writes it: a field added since then
    appears with its default, so it does not make finished work look stale; ``train.report_to`` is taken
    from the config ``now`` (where metrics go changes no result). None if it no longer parses."""
    try:
        stage = from_dict(StageConfig, yaml.safe_load(saved), "config.yaml")
    except (ConfigError, TypeError, ValueError, yaml.YAMLError):
        return None
    stage.train.report_to = yaml.safe_load(now)["train"]["report_to"]
    return _stage_yaml(stage)


def _check_same_config(stage_dir: Path, text: str) -> None:
    path = stage_dir / "config.yaml"
    if path.is_file() and path.read_text() != text and _saved_config_as_now(path.read_text(), text) != text:
        raise StageConfigChanged(
            f"{stage_dir} was produced by a different configuration of this stage (see {path}); "
            "use another --output, or delete that folder to start the stage again"
        )


def _clear_stage(stage_dir: Path) -> None:
    """Remove what the runner wrote for a finished stage (``DONE``, ``final/``, checkpoints, logs, prepared
    artifacts), so a stale stage prepares and trains again from the start; ``config.yaml`` stays (it
    matches)."""
    (stage_dir / "DONE").unlink()
    for name in ("final", "tensorboard"):
        if (stage_dir / name).is_dir():
            shutil.rmtree(stage_dir / name)
    for path in stage_dir.iterdir():  # prepared artifacts (mmfactory.artifacts): made from the old inputs
        if path.is_dir() and recorded_fingerprint(path) is not None:
            shutil.rmtree(path)
    for _, path in ckpt.list_checkpoints(stage_dir):
        shutil.rmtree(path)
    (stage_dir / "metrics.jsonl").unlink(missing_ok=True)


def _done_summary(stage_dir: Path, is_main: bool) -> dict | None:
    """The summary in the stage's ``DONE``, or None when the stage is not done (or its ``DONE`` is
    unreadable, written by no version of the runner that writes it atomically: the stage then runs again)."""
    done = stage_dir / "DONE"
    if not done.is_file():
        return None
    try:
        return json.loads(done.read_text())
    except ValueError:
        if is_main:
            print(f"warning: {done} is unreadable; the stage runs again", file=sys.stderr)
        return None


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "false").lower() in ("1", "true", "yes")


def check_engine(recipe: Recipe) -> None:
    """Refuse a launch whose accelerate config asks for an engine the loop does not support: DeepSpeed (its
    processes hold shards the loop cannot save yet) and FSDP version 1 (FSDP2, ``fully_shard``, is supported),
    or FSDP for a stage with a weight EMA. accelerate's launcher names the engine in these variables."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "DeepSpeed is not supported yet: its processes hold shards of the weights that the loop cannot "
            "save (ACCELERATE_USE_DEEPSPEED is set by the launch config); launch with FSDP2 or DDP: "
            "configs/accelerate/fsdp.yaml or ddp.yaml (docs/distributed.md)"
        )
    if not _flag("ACCELERATE_USE_FSDP"):
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config's fsdp_config "
            "(FSDP2, fully_shard), as configs/accelerate/fsdp.yaml does (docs/distributed.md)"
        )
    for i, stage in enumerate(recipe.stages):
        if stage.train.ema_decay is not None:
            raise ConfigError(
                f"stages[{i}].train.ema_decay: a weight EMA is not supported under FSDP yet; set it to "
                "null for this launch, or launch with DDP (configs/accelerate/ddp.yaml)"
            )


def _make_accelerator(stage: StageConfig) -> Accelerator:
    # Each stage may pick its own precision; accelerate keeps one global state, so reset it per stage.
    AcceleratorState._reset_state(reset_partial_state=False)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=stage.train.find_unused_parameters)]
    # accelerate only treats torchrun-launched processes as multi-process CPU (gloo) when told `cpu`.
    cpu = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    if cpu and _flag("ACCELERATE_USE_FSDP"):
        # accelerate switches FSDP on for GPU-like states only, and `cpu` would silently make it DDP: start
        # the gloo state, then label it GPU-like so that the Accelerator reads the FSDP plugin (CPU tests).
        PartialState(cpu=True)
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        cpu = False
    return Accelerator(cpu=cpu, mixed_precision=stage.train.precision, kwargs_handlers=handlers)


def run_stage(
    stage: StageConfig,
    index: int,
    run_dir: Path,
    stage_outputs: dict[str, Path],
    lineage: dict,
    recipe_name: str = "",
    trackers: Sequence[GeneralTracker] = (),
) -> dict:
    """Prepare the stage's model-made data (``task.prepare``), train one stage (resuming if it has
    checkpoints; a task that trains nothing runs instead), save ``final/`` with its model card and write
    ``DONE`` with the stage's fingerprint (of the model files, not the card) and ``lineage``
    (:mod:`mmfactory.lineage`). A stage that trains also reports its metrics to the custom ``trackers``."""
    stage_dir = run_dir / stage.name
    accelerator = _make_accelerator(stage)
    text = _stage_yaml(stage)
    if accelerator.is_main_process:
        _check_same_config(stage_dir, text)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.yaml").write_text(text)
    accelerator.wait_for_everyone()
    set_seed(stage.train.seed)  # model init depends only on the seed: frozen parts rebuild identically
    upstream = {name: f for name, f in lineage.get("upstream", {}).items() if f is not None}
    ctx = StageContext(run_dir, stage_dir, dict(stage_outputs), accelerator.is_main_process, upstream)
    task = build_task(stage, index, ctx).to(accelerator.device)
    task.prepare(accelerator)  # model-made data (teacher top-k, sampled pairs...): the main process writes
    if task.trains:
        summary, trained = train_stage(
            task, stage, stage_dir, accelerator, trackers, rebuild=lambda: build_task(stage, index, ctx)
        )
    else:
        start = time.perf_counter()
        metrics = task.run(accelerator)
        accelerator.wait_for_everyone()
        summary = {"steps": 0, "time_s": round(time.perf_counter() - start, 2), "metrics": metrics}
        trained = task
    # the task that read the training data, and under FSDP the copy that read the eval data at the end
    data_report = task.data_report()
    if trained is not task:
        data_report.update(trained.data_report())
    task = trained
    if data_report:
        summary["data"] = data_report
    if accelerator.is_main_process:
        final = stage_dir / "final"
        tmp = ckpt.atomic_dir(final)
        task.save_pretrained(tmp)
        (tmp / MODEL_CARD).write_text(model_card(recipe_name, stage, summary))
        ckpt.commit_dir(tmp, final)
        for _, path in ckpt.list_checkpoints(stage_dir):  # the stage is complete: final/ supersedes them
            shutil.rmtree(path)
        done = {**summary, "fingerprint": dir_fingerprint(final), "lineage": lineage}
        write_atomic(stage_dir / "DONE", json.dumps(done, indent=1))
        summary.update(fingerprint=done["fingerprint"])
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # all name the stage by the fingerprint main wrote
        summary.update(fingerprint=json.loads((stage_dir / "DONE").read_text())["fingerprint"])
    return summary


def preflight(recipe: Recipe) -> None:
    """The checks :func:`run_recipe` makes before anything trains: every stage's task schemas, its data
    sources' paths, its trackers, and that each reference (``init_from``, ``options.teacher``, a
    ``keep_uids`` selection) names an earlier stage, a folder or a hub id; and that the launch asks for no
    sharded engine (:func:`check_engine`). Raises :class:`ConfigError`."""
    check_engine(recipe)
    for i, stage in enumerate(recipe.stages):
        _, _, data_cfg, options = validate_stage(stage, i)
        check_source_paths(data_cfg, f"stages[{i}].data")
        check_installed(stage.train.report_to, f"stages[{i}].train.report_to")
        earlier = [s.name for s in recipe.stages[:i]]
        references = {"init_from": stage.init_from, "options.teacher": getattr(options, "teacher", None)}
        for name, index, source in stage_sources(data_cfg):
            stage_name = (source.keep_uids or "").partition("/")[0]  # keep_uids may name STAGE/keep-F
            references[f"data.{name}[{index}].keep_uids"] = (
                stage_name if stage_name in earlier else source.keep_uids
            )
        known = ", ".join(earlier) or "none"
        for key, value in references.items():
            if value is None or value in earlier or Path(value).expanduser().exists():
                continue
            if key.endswith("keep_uids"):
                raise ConfigError(
                    f"stages[{i}].{key}: {value!r} is neither an earlier stage ({known}) nor a folder"
                )
            try:  # a hub id: fetched now (or found in the cache), so a typo fails before anything trains
                resolve_model_folder(value, key)
            except FileNotFoundError:
                raise ConfigError(f"stages[{i}].{key}: {value!r} is {not_a_model_source(known)}") from None


def run_recipe(
    recipe: Recipe,
    run_dir: Path,
    rerun_stale: bool = True,
    on_stage: Callable[[int, StageConfig], None] | None = None,
    trackers: Sequence[GeneralTracker] = (),
) -> dict:
    """Run every stage not yet done, or done from inputs that changed since (stale, :mod:`mmfactory.lineage`:
    run again, or refused when ``rerun_stale`` is False); returns (and writes, on the main process) the
    results dict. ``on_stage(index, stage)`` is called before each stage (for progress lines). Every stage
    that trains also reports to the custom ``trackers`` (accelerate ``GeneralTracker`` instances, started
    and finished once per stage), besides those its ``train.report_to`` names."""
    preflight(recipe)
    run_dir = Path(run_dir)
    stage_outputs: dict[str, Path] = {}
    results: dict = {"recipe": recipe.name, "compare": recipe.compare, "stages": {}, "metrics": {}}
    is_main = int(os.environ.get("RANK", "0")) == 0
    fingerprints: dict[str, str] = {}
    for i, stage in enumerate(recipe.stages):
        if on_stage is not None:
            on_stage(i, stage)
        stage_dir = run_dir / stage.name
        summary = _done_summary(stage_dir, is_main)
        current = stage_lineage(stage, fingerprints)
        if summary is not None:
            _check_same_config(stage_dir, _stage_yaml(stage))
            stale = stale_reason(summary.get("lineage"), current)
            if stale is not None and not rerun_stale:
                raise ConfigError(
                    f"stages[{i}] {stage.name}: done, but {stale} (rerun without --no-rerun-stale)"
                )
            if stale is not None:
                if is_main:
                    print(f"[{stage.name}] {stale}: running it again")
                    _clear_stage(stage_dir)
                summary = None
        if summary is not None:
            summary["skipped"] = True
            if is_main:
                print(f"[{stage.name}] already done: skipped ({stage_dir / 'DONE'})")
        else:
            summary = run_stage(stage, i, run_dir, stage_outputs, current, recipe.name, trackers)
        fingerprints[stage.name] = summary.pop("fingerprint", None)
        summary.pop("lineage", None)
        stage_outputs[stage.name] = stage_dir / "final"
        results["stages"][stage.name] = summary
        for key, value in summary.get("metrics", {}).items():
            results["metrics"][f"{stage.name}/{key}"] = value
    results["environment"] = environment()
    if is_main:
        write_atomic(run_dir / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
        print(format_results(results))
        if recipe.compare:
            print(format_comparison(results, recipe.compare))
    return results


def format_comparison(results: dict, metrics: list[str]) -> str:
    """The recipe's ``compare`` metrics side by side: one row per stage that reports any of them."""
    rows = [
        (stage, [s["metrics"].get(m) for m in metrics])
        for stage, s in results["stages"].items()
        if any(m in s["metrics"] for m in metrics)
    ]
    name_width = max([len(stage) for stage, _ in rows] + [5])
    widths = [max(len(m), 8) for m in metrics]
    header = "  ".join(
        [f"{'stage':<{name_width}}", *(f"{m:>{w}}" for m, w in zip(metrics, widths, strict=True))]
    )
    lines = [f"Comparison ({results['recipe']})", header, "-" * len(header)]
    for stage, values in rows:
        cells = [
            f"{'-' if v is None else f'{v:.2f}' if isinstance(v, float) else v:>{w}}"
            for v, w in zip(values, widths, strict=True)
        ]
        lines.append("  ".join([f"{stage:<{name_width}}", *cells]))
    return "\n".join(lines)


def format_results(results: dict) -> str:
    """A plain-text table of every stage's metrics."""
    rows = [
        (stage, key, value) for stage, s in results["stages"].items() for key, value in s["metrics"].items()
    ]
    width = max([len(f"{s}/{k}") for s, k, _ in rows] + [6])
    lines = [f"Results of {results['recipe']}", f"{'metric':<{width}}  value", "-" * (width + 14)]
    for stage, key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{f'{stage}/{key}':<{width}}  {shown}")
    for stage, s in results["stages"].items():
        note = " (skipped: done earlier)" if s.get("skipped") else ""
        lines.append(f"{stage}: {s['steps']} steps in {s['time_s']:.1f}s{note}")
        data = ", ".join(f"{k}={v}" for k, v in s.get("data", {}).items())
        if data:
            lines.append(f"{stage} data: {data}")
    return "\n".join(lines)
