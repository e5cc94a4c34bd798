"""The model card (``README.md``) written into every stage's ``final/``: what made the model (recipe, stage,
task, start, data, what trained and how) and what it measured, in the Hugging Face hub's card format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfactory.config import StageConfig

MODEL_CARD = "README.md"

# Host-dependent numbers (throughput, time, memory) stay in DONE / metrics.jsonl: the card, like the
# weights, is the same whenever the same stage is trained again.
_HOST_DEPENDENT = ("_per_s", "time_s", "memory_mb")


def _source(source: dict[str, Any]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in source.items())


def _data_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for field, value in data.items():
        if isinstance(value, list) and value and all(isinstance(s, dict) for s in value):
            lines += [f"- `{field}`: {_source(s)}" for s in value]
        elif value is not None and value != []:
            lines.append(f"- `{field}`: {value}")
    return lines


def model_card(recipe: str, stage: StageConfig, summary: dict[str, Any]) -> str:
    """Markdown with YAML front matter; ``summary`` is the stage's ``{"steps", "metrics", ...}``."""
    start = stage.init_from or stage.model.get("path") or "initialised from its config"
    front = ["---", "library_name: transformers", f"tags: [mmfactory, {stage.task}]"]
    start_id = stage.init_from or ""
    if start_id.count("/") == 1 and not Path(start_id).expanduser().exists():  # a hub id (org/name)
        front.append(f"base_model: {start_id}")
    t, o = stage.train, stage.optimizer
    lines = [
        *front,
        "---",
        "",
        f"# {recipe} / {stage.name}",
        "",
        f"Trained with mmfactory: recipe `{recipe}`, stage `{stage.name}`, task `{stage.task}`, starting "
        f"from `{start}`. Load it with transformers' Auto classes, after `import mmfactory.auto` when its "
        "model type is one of mmfactory's; the tokenizer holds the chat template the model was trained "
        "with.",
        "",
        "## Data",
        "",
        *(_data_lines(stage.data) or ["- (none)"]),
        "",
        "## Training",
        "",
        f"- steps: {summary.get('steps', 0)}, batch size {t.batch_size} x {t.grad_accum} accumulation, "
        f"precision {t.precision}, seed {t.seed}",
        f"- optimizer: {o.name}, lr {o.lr:g}, weight decay {o.weight_decay:g}; "
        f"schedule: {stage.schedule.kind}",
        f"- trainable: {', '.join(f'`{p}`' for p in stage.trainable)}"
        + (f"; frozen: {', '.join(f'`{p}`' for p in stage.frozen)}" if stage.frozen else ""),
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for name, value in sorted((summary.get("metrics") or {}).items()):
        if isinstance(value, int | float) and not name.endswith(_HOST_DEPENDENT):
            lines.append(f"| {name} | {value:.4g} |")
    return "\n".join(lines) + "\n"
