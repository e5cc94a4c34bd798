"""The claims registry (``claims.yaml``) and the verdicts it reads off recipe runs.

A method's claim is tested by checks on ``results.json`` metrics of its recipe, one run per seed. Each check
gives a number per seed (a difference, a ratio or a value) and holds when it clears its bar; a method is
``yes`` when every check holds on every seed, ``no`` when none holds on any seed, else ``partly``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import yaml

from mmfactory.config import ConfigError, from_dict

PROFILES = ("quick", "full")


@dataclass
class Check:
    """One inequality on a run's metrics (see ``claims.yaml``): ``compare`` (A beats B by more than
    ``margin`` in ``direction``), ``ratio`` (A / B >= ``at_least``) or ``value`` (A >= ``at_least`` and/or
    A <= ``at_most``)."""

    label: str
    compare: list[str] | None = None
    ratio: list[str] | None = None
    value: str | None = None
    direction: Literal["higher", "lower"] = "higher"
    margin: float = 0.0
    at_least: float | None = None
    at_most: float | None = None

    def validate(self) -> None:
        kinds = [k for k in ("compare", "ratio", "value") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"{self.label}: give exactly one of compare, ratio, value (got {kinds})")
        for kind in ("compare", "ratio"):
            pair = getattr(self, kind)
            if pair is not None and len(pair) != 2:
                raise ConfigError(f"{self.label}: {kind} takes two metric keys, got {pair}")
        if self.ratio is not None and self.at_least is None:
            raise ConfigError(f"{self.label}: a ratio check needs at_least")
        if self.value is not None and self.at_least is None and self.at_most is None:
            raise ConfigError(f"{self.label}: a value check needs at_least or at_most")

    @property
    def keys(self) -> list[str]:
        return self.compare or self.ratio or [self.value]

    def measure(self, metrics: dict) -> float | None:
        """The checked number on one run (A - B, A / B or A); None when a key is missing or not finite."""
        values = [metrics.get(k) for k in self.keys]
        if any(not isinstance(v, int | float) or not math.isfinite(v) for v in values):
            return None
        if self.compare is not None:
            return values[0] - values[1]
        if self.ratio is not None:
            return values[0] / values[1] if values[1] else None
        return values[0]

    def holds(self, number: float) -> bool:
        if self.compare is not None:
            return (number if self.direction == "higher" else -number) > self.margin
        if self.ratio is not None:
            return number >= self.at_least
        return (self.at_least is None or number >= self.at_least) and (
            self.at_most is None or number <= self.at_most
        )


@dataclass
class Profile:
    minutes: float
    overrides: list[str] = field(default_factory=list)


@dataclass
class RecipeProfiles:
    quick: Profile
    full: Profile


@dataclass
class Method:
    """A paper's method: its claim, the recipe that tests it (None: not built yet) and the checks."""

    method: str
    paper: str
    recipe: str | None = None
    checks: list[Check] = field(default_factory=list)


@dataclass
class Registry:
    recipes: dict[str, RecipeProfiles]
    methods: list[Method]

    def validate(self) -> None:
        for m in self.methods:
            if m.recipe is not None and m.recipe not in self.recipes:
                raise ConfigError(f"methods: {m.method} names recipe {m.recipe!r}, which has no profiles")
            if m.recipe is not None and not m.checks:
                raise ConfigError(f"methods: {m.method} has a recipe and no checks")
            for check in m.checks:
                check.validate()

    def select(self, only: list[str] | None) -> list[Method]:
        """The methods named in ``only`` (case-insensitive; all when None), refusing unknown names."""
        if not only:
            return list(self.methods)
        known = {m.method.lower(): m for m in self.methods}
        unknown = [name for name in only if name.lower() not in known]
        if unknown:
            raise ConfigError(
                f"--only: unknown method(s) {unknown}; known: {[m.method for m in self.methods]}"
            )
        return [known[name.lower()] for name in only]


def load_registry(text: str | None = None) -> Registry:
    """The shipped ``claims.yaml`` (or ``text``), validated."""
    if text is None:
        text = resources.files("mmfactory.reproduce").joinpath("claims.yaml").read_text(encoding="utf-8")
    return from_dict(Registry, yaml.safe_load(text), "claims")


def _spread(numbers: list[float]) -> str:
    mean = statistics.fmean(numbers)
    if len(numbers) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(numbers):.2g}"


MARKS = {"holds": "✓", "fails": "✗", "mixed": "~", "missing": "?", "not judged": "–"}  # a check's state


def _not_judged(key: str, metrics: dict) -> bool:
    """A rate its run left out because the checker recognised no claim: the sibling ``judged`` share is
    there (NoteBench's "not judged", :mod:`mmfactory.sag.notebench`)."""
    return f"{key.rpartition('/')[0]}/judged" in metrics


def judge(method: Method, runs: dict[int, dict], seeds: list[int]) -> dict:
    """The claims-table row of ``method`` from its recipe's ``results.json`` metrics per seed (``runs``:
    seed -> metrics; a missing seed is a run that did not finish)."""
    row = {"method": method.method, "paper": method.paper, "recipe": method.recipe, "checks": []}
    if method.recipe is None:
        return {**row, "verdict": "not built", "measured": "", "reason": "no recipe implements it yet"}
    missing = [s for s in seeds if s not in runs]
    if missing:
        return {
            **row,
            "verdict": "not run",
            "measured": "",
            "reason": f"no finished run for seed(s) {missing}",
        }
    states = []
    for check in method.checks:
        numbers = [check.measure(runs[s]) for s in seeds]
        if any(n is None for n in numbers):
            absent = sorted({k for s in seeds for k in check.keys if k not in runs[s]})
            if absent and all(_not_judged(k, runs[s]) for s in seeds for k in absent if k not in runs[s]):
                detail = f"not judged: no claim recognised ({', '.join(absent)})"
                row["checks"].append({"label": check.label, "state": "not judged", "detail": detail})
                continue  # says nothing either way: left out of the verdict
            row["checks"].append({"label": check.label, "state": "missing", "detail": f"no metric {absent}"})
            states.append("missing")
            continue
        held = [check.holds(n) for n in numbers]
        state = "holds" if all(held) else "fails" if not any(held) else "mixed"
        states.append(state)
        sides = " vs ".join(_spread([runs[s][k] for s in seeds]) for k in check.keys)
        shown = f"{'ratio ' if check.ratio else ''}{_spread(numbers)}"
        detail = sides if check.value is not None else f"{sides} ({'Δ ' if check.compare else ''}{shown})"
        row["checks"].append({"label": check.label, "state": state, "detail": detail, "per_seed": numbers})
    if "missing" in states:
        verdict = "not run"
    elif not states:
        verdict = "not judged"
    elif all(s == "holds" for s in states):
        verdict = "yes"
    elif all(s == "fails" for s in states):
        verdict = "no"
    else:
        verdict = "partly"
    measured = "; ".join(f"{c['label']}: {c['detail']}" for c in row["checks"])
    reason = "; ".join(f"{MARKS[c['state']]} {c['label']}" for c in row["checks"])
    return {**row, "verdict": verdict, "measured": measured, "reason": reason}
