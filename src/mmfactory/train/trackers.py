"""Where a stage's metrics go (``train.report_to``): ``metrics.jsonl`` and accelerate's trackers.

``jsonl`` is mmfactory's own writer (``mmfactory report`` draws its curves from ``metrics.jsonl``). Every
other name is accelerate's tracker of that name (:mod:`accelerate.tracking`): ``tensorboard`` writes into
``STAGE/tensorboard/``; ``wandb``, ``mlflow``, ... log one run per stage (named after it) into the project
named after the run's output folder, and take the rest of their settings from their own environment
variables (``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``, ...). Custom
:class:`~accelerate.tracking.GeneralTracker` instances join them through ``run_recipe(..., trackers=...)``.

Every sink receives the same scalars at the same steps, from the main process only, and a resumed stage
hides what it is about to redo from ``metrics.jsonl`` and tensorboard alike. The trackers are driven here
rather than through ``Accelerator(log_with=...)``: ``Accelerator.end_training`` also destroys the process
group that the run's next stage still needs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import accelerate.utils
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, TensorBoardTracker

from mmfactory.config import ConfigError, StageConfig, to_dict

PIP_NAME = {"comet_ml": "comet-ml"}  # where a tracker's pip package is not named like the tracker
RUN_NAME_KEY = {"wandb": "name", "mlflow": "run_name"}  # the keyword that names a tracker's run


def check_installed(report_to: list[str], where: str) -> None:
    """Refuse a tracker whose package is missing, with the pip command that installs it."""
    for name in report_to:
        if name != "jsonl" and not getattr(accelerate.utils, f"is_{name}_available")():
            raise ConfigError(f"{where}: {name!r} is not installed (pip install {PIP_NAME.get(name, name)})")


def flat_config(stage: StageConfig) -> dict[str, bool | int | float | str]:
    """The stage's settings as the hyperparameters trackers store, ``{"train.batch_size": 8, ...}``; a list,
    an empty mapping or null as its JSON text (tensorboard's hparams take nothing else)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(key: str, node: object) -> None:
        if isinstance(node, dict) and node:
            for name, value in node.items():
                walk(f"{key}.{name}" if key else str(name), value)
        else:
            flat[key] = node if isinstance(node, bool | int | float | str) else json.dumps(node)

    walk("", to_dict(stage))
    return flat


def _drop_records_after(path: Path, resume_step: int) -> None:
    """Drop the records a resumed run is about to redo, and a line torn by a crash."""
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            print(f"warning: {path}: dropped a torn line ({line[:40]!r})", file=sys.stderr)
            continue
        if record.get("step", 0) <= resume_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


@dataclass
class MetricsLog:
    """A stage's metrics on the main process: ``metrics.jsonl`` (one record per log step) and its trackers."""

    stage: StageConfig
    stage_dir: Path
    enabled: bool
    extra: Sequence[GeneralTracker] = ()  # custom trackers, started and finished with the stage
    trackers: list[GeneralTracker] = field(default_factory=list, init=False)

    @property
    def jsonl(self) -> bool:
        return "jsonl" in self.stage.train.report_to

    def open(self, resume_step: int) -> None:
        if not self.enabled:
            return
        path = self.stage_dir / "metrics.jsonl"
        if self.jsonl and path.exists():
            _drop_records_after(path, resume_step)
        for name in self.stage.train.report_to:
            if name == "tensorboard":  # purge_step hides from tensorboard the steps a resumed run redoes
                purge = resume_step + 1 if resume_step else None
                self.trackers.append(TensorBoardTracker("tensorboard", self.stage_dir, purge_step=purge))
            elif name != "jsonl":
                cls = LOGGER_TYPE_TO_CLASS[name]
                # a tracker with a local repository (aim) keeps one for the whole run, in --output
                folder = (self.stage_dir.parent,) if cls.requires_logging_directory else ()
                run_name = {RUN_NAME_KEY[name]: self.stage.name} if name in RUN_NAME_KEY else {}
                self.trackers.append(cls(self.stage_dir.parent.name, *folder, **run_name))
        self.trackers += self.extra
        config = flat_config(self.stage)
        for tracker in self.trackers:
            tracker.start()
            tracker.store_init_configuration(config)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        if self.jsonl:
            with open(self.stage_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
