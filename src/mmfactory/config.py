"""Typed recipe schemas: YAML recipes of stages, strict validation and dotted CLI overrides.

A recipe is a name, shared ``defaults`` and an ordered list of ``stages``; each stage is merged over the
defaults and validated against :class:`StageConfig`, and its ``model`` / ``data`` / ``options`` sections
against the schemas its task declares. Unknown keys and wrong types are refused with the dotted key path
and a did-you-mean suggestion::

    ConfigError: stages[0].train.max_step: unknown key (did you mean 'max_steps'?)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message starts with the dotted key path."""


# --------------------------------------------------------------------------------------------------
# Generic strict conversion of plain YAML data into dataclasses
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise :class:`ConfigError` naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [arg for arg in args if arg is not type(None)]
        if len(choices) == 1:  # ``X | None``: X's own error says more than "expected X | None"
            return _convert(choices[0], value, path)
        for arg in choices:
            try:
                return _convert(arg, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, val_tp = args or (str, Any)
        return {str(k): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `3e-4` (no dot) as a string: accept numeric strings for float fields.
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _group_type(tp: Any) -> type | None:
    """The dataclass of a nested option group typed ``X`` or ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        choices = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        tp = choices[0] if len(choices) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _unknown_key_hint(key: str, fields: list[str], hints: dict[str, Any]) -> str:
    """Did-you-mean for an unknown key: the closest key of this level or of a nested group, so that a flat
    key that moved into a group names it (``beta``: ``dpo.beta``; ``eval_generate``: ``eval.generate``)."""

    def ratio(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a, b).ratio()

    scores = {name: ratio(key, name) for name in fields}
    for name in fields:
        group = _group_type(hints[name])
        for sub in dataclasses.fields(group) if group is not None else ():
            scores[f"{name}.{sub.name}"] = max(ratio(key, sub.name), ratio(key, f"{name}_{sub.name}"))
    best = max(scores, key=scores.__getitem__, default=None)  # on a tie, this level's key
    if best is not None and scores[best] >= 0.6:  # difflib.get_close_matches' cutoff
        return f" (did you mean {best!r}?)"
    return f" (known keys: {', '.join(fields)})"


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, refusing unknown keys, wrong types and missing fields.

    A field typed as another dataclass (or ``X | None``) is a nested group, built the same way at
    ``path.field``; every group's ``validate()`` runs as it is built, its errors prefixed with its path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            hint = _unknown_key_hint(str(key), list(fields), hints)
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in kwargs and no_default:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}" if path else str(err)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) config dataclass, for writing the resolved config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------------
# Stage and recipe schemas
# --------------------------------------------------------------------------------------------------


@dataclass
class OptimizerConfig:
    """AdamW (or SGD); weight decay is not applied to biases, norms and other 1-D parameters."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: each must be in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ConfigError(f"eps: must be > 0, got {self.eps}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")


@dataclass
class ScheduleConfig:
    """Linear warmup then cosine / linear decay to ``min_lr_ratio * lr`` (or constant)."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")


EXACTLY_ONE_LENGTH = "max_steps: set exactly one of train.max_steps and train.epochs"
# Where a stage's metrics go (mmfactory.train.trackers): metrics.jsonl, or one of accelerate's trackers.
ReportTo = Literal[
    "tensorboard", "jsonl", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"
]


@dataclass
class TrainConfig:
    """Loop settings; the global batch is ``batch_size * grad_accum * num_processes``."""

    max_steps: int | None = None  # optimizer steps; exactly one of max_steps / epochs
    epochs: float | None = None
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    eval_every: int | None = None  # steps; None = only at the end
    eval_batch_size: int | None = None
    save_every: int | None = None  # steps; None = only the final model
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 0
    shuffle: bool = True
    # Sort each global batch by modality then length before cutting it into micro-batches (LLaVA's
    # group_by_modality_length): fewer pad tokens, and every step still trains on the same samples.
    group_by_length: bool = False
    find_unused_parameters: bool = False  # DDP: needed when some trainable parameters may get no gradient
    # Activation checkpointing of every Hugging Face model in the task that supports it: each layer's
    # activations are recomputed in the backward pass instead of kept (less memory, more time).
    gradient_checkpointing: bool = False
    # An exponential moving average of the trainable weights (timm's ModelEma), updated after every step;
    # the stage then also reports its evaluation with the averaged weights as ema_* (null: none).
    ema_decay: float | None = None
    report_to: list[ReportTo] = field(default_factory=lambda: ["tensorboard", "jsonl"])

    def validate(self) -> None:
        if self.max_steps is not None and self.epochs is not None:  # neither: tasks.validate_stage
            raise ConfigError(EXACTLY_ONE_LENGTH)
        for name in self.report_to:
            if self.report_to.count(name) > 1:
                raise ConfigError(f"report_to: {name!r} is listed twice")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "max_steps"):
            for_steps = getattr(self, name)
            if for_steps is not None and for_steps < 1:
                raise ConfigError(f"{name}: must be >= 1, got {for_steps}")
        for name in ("eval_every", "eval_batch_size", "save_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 (or null), got {getattr(self, name)}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs: must be > 0, got {self.epochs}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm: must be > 0 (null: no clipping), got {self.max_grad_norm}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in (0, 1) (null: no EMA), got {self.ema_decay}")


@dataclass
class StageConfig:
    """One stage: a task, its model(s) and data, what trains, and how.

    ``model`` / ``data`` / ``options`` are validated by the schemas the task declares.
    ``trainable`` and ``frozen`` are glob patterns over the task's parameter names (``frozen`` wins).
    ``init_from`` is an earlier stage's name (its ``final/`` output) or a local path. A stage with
    ``enabled: false`` is left out of the run (e.g. a from-scratch curriculum step, with real checkpoints).
    """

    name: str
    task: str
    enabled: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    trainable: list[str] = field(default_factory=lambda: ["*"])
    frozen: list[str] = field(default_factory=list)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))

    def validate(self) -> None:
        if not STAGE_NAME.fullmatch(self.name) or self.name in (".", ".."):
            raise ConfigError(
                f"name: {self.name!r} is not a stage name (letters, digits, '_', '-', '.'; it names the "
                "stage's folder inside --output)"
            )


STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
MAX_RECIPE_NODES = 100_000  # values in a recipe after YAML aliases are expanded


@dataclass
class Recipe:
    name: str
    stages: list[StageConfig]
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where it was loaded from (filled in by load_recipe)
    compare: list[str] = field(default_factory=list)  # metrics shown side by side for every stage with them


RECIPE_KEYS = ("name", "description", "defaults", "stages", "compare")


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'stages.sft.train.max_steps=5'`` -> (['stages', 'sft', 'train', 'max_steps'], 5).

    The value is parsed as YAML, so ``5``, ``3e-4``, ``true``, ``[a, b]`` and ``null`` get their types.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r}: empty key in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value: {err}") from None
    return keys, value


def _set_path(data: dict, keys: list[str], value: Any, where: str) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(keys[: i + 1])} is not a mapping")
        node = child
    node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides to a raw recipe mapping.

    ``stages.NAME.rest`` (or ``stages.INDEX.rest``) targets one stage, ``defaults.rest`` the shared
    defaults, ``name``/``description`` the recipe; any other path (``train.max_steps=5``) applies to
    every stage.
    """
    # Copy each stage on its own: YAML anchors (`<<: *base`) share nested mappings between stages, and
    # one deepcopy would keep them shared, leaking an override of one stage into the others.
    stages = [copy.deepcopy(stage) for stage in raw.get("stages") or []]
    raw = {**copy.deepcopy({k: v for k, v in raw.items() if k != "stages"}), "stages": stages}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "stages":
            if len(keys) < 3:
                raise ConfigError(f"override {text!r}: use stages.<name>.<key>=value")
            names = [s.get("name") if isinstance(s, dict) else None for s in stages]
            target = keys[1]
            if target.isdigit() and int(target) < len(stages):
                index = int(target)
            elif target in names:
                index = names.index(target)
            else:
                close = difflib.get_close_matches(target, [n for n in names if n], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (stages: {names})"
                raise ConfigError(f"override {text!r}: no stage {target!r}{hint}")
            _set_path(stages[index], keys[2:], value, f"override {text!r}")
        elif keys[0] in RECIPE_KEYS:
            _set_path(raw, keys, value, f"override {text!r}")
        else:
            for stage in stages:
                _set_path(stage, keys, value, f"override {text!r}")
    return raw


def recipe_from_dict(raw: dict, overrides: list[str] = (), source: str = "") -> Recipe:
    """Validate a raw recipe mapping (after overrides); each stage is merged over ``defaults``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source or 'recipe'}: expected a mapping at the top level")
    raw = apply_overrides(raw, list(overrides))
    for key in raw:
        if key not in RECIPE_KEYS:
            close = difflib.get_close_matches(str(key), RECIPE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
    if "name" not in raw:
        raise ConfigError("name: required key is missing")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError("defaults: expected a mapping")
    stages_raw = raw.get("stages") or []
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("stages: expected a non-empty list of stages")
    stages = []
    for i, stage_raw in enumerate(stages_raw):
        if not isinstance(stage_raw, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping, got {stage_raw!r}")
        stages.append(from_dict(StageConfig, deep_merge(defaults, stage_raw), f"stages[{i}]"))
    names = [s.name for s in stages]
    disabled = {s.name for s in stages if not s.enabled}
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"stages[{i}].name: duplicate stage name {name!r}")
        init = stages[i].init_from
        if init is not None and init in names[i:]:
            raise ConfigError(f"stages[{i}].init_from: stage {init!r} does not run before {name!r}")
        if init in disabled and name not in disabled:
            raise ConfigError(
                f"stages[{i}].init_from: stage {init!r} is disabled (enabled: false); "
                f"set stages.{name}.init_from to a stage that runs"
            )
    stages = [s for s in stages if s.enabled]
    if not stages:
        raise ConfigError("stages: every stage is disabled (enabled: false)")
    return Recipe(
        name=_convert(str, raw["name"], "name"),
        description=_convert(str, raw.get("description", ""), "description"),
        defaults=defaults,
        stages=stages,
        source=source,
        compare=_convert(list[str], raw.get("compare") or [], "compare"),
    )


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    _check_size(raw, path)
    return recipe_from_dict(raw, overrides, source=str(path))


def _check_size(raw: Any, path: Path) -> None:
    """Refuse a recipe of more than MAX_RECIPE_NODES values once its aliases are expanded (YAML anchors
    let a few hundred bytes stand for millions of values)."""
    seen, stack = 0, [raw]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_NODES:
            raise ConfigError(
                f"{path}: more than {MAX_RECIPE_NODES} values once its YAML aliases are expanded; "
                "a recipe this large is a mistake (or an alias bomb)"
            )
        if isinstance(node, dict):
            stack += node.values()
        elif isinstance(node, list):
            stack += node
