"""``mmfactory reproduce``: run each method's recipe per seed and collect the claims table.

Layout of the output folder::

    OUT/reproduce.json            profile, seeds, methods, per-run times and errors, environment
    OUT/claims.json, claims.md    the claims table (rows of :func:`~mmfactory.reproduce.claims.judge`)
    OUT/<recipe>/seed-<s>/        an ordinary run folder (``mmfactory report`` reads any of them)

Rerunning the same command resumes: finished stages are skipped, an interrupted one resumes from its last
checkpoint. A recipe that fails is reported in its rows (one line, the reason) and the others still run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmfactory.atomic import write_atomic
from mmfactory.config import ConfigError, StageConfig, load_recipe
from mmfactory.environment import environment
from mmfactory.recipes import resolve_recipe
from mmfactory.reproduce.claims import MARKS, PROFILES, Method, judge, load_registry
from mmfactory.runner import run_recipe

QUICK_NOTE = (
    "quick profile: a pipeline check with reduced steps and benchmarks; its verdicts are not evidence "
    "(run --profile full for that)"
)


def run_dir_of(out: Path, recipe: str, seed: int) -> Path:
    return out / recipe.replace("/", "-") / f"seed-{seed}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Progress:
    """One line per recipe and stage: position, elapsed time and an estimate of the rest, from the
    profile's measured minutes per recipe scaled by how fast this machine has been so far."""

    plan: list[tuple[str, int, float]]  # (recipe, seed, estimated seconds)
    start: float = field(default_factory=time.perf_counter)
    done_estimate: float = 0.0  # estimated seconds of the finished runs
    done_actual: float = 0.0

    def line(self, index: int, text: str, fraction: float = 0.0) -> None:
        """Print ``text`` for run ``index`` of the plan, ``fraction`` of it done."""
        elapsed = time.perf_counter() - self.start
        speed = self.done_actual / self.done_estimate if self.done_estimate > 0 else 1.0
        rest = (1 - fraction) * self.plan[index][2] + sum(e for _, _, e in self.plan[index + 1 :])
        recipe, seed, _ = self.plan[index]
        print(
            f"[reproduce {index + 1}/{len(self.plan)} {recipe} seed {seed}] {text} · "
            f"elapsed {_clock(elapsed)} · about {_clock(rest * speed)} left",
            flush=True,
        )

    def finished(self, index: int, seconds: float) -> None:
        """Run ``index`` trained for ``seconds`` (not called for a run found done: no speed to learn)."""
        self.done_estimate += self.plan[index][2]
        self.done_actual += seconds


def _results_metrics(run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else None


def claims_markdown(rows: list[dict], profile: str, seeds: list[int]) -> str:
    """The claims table as Markdown (the README's table comes from the full profile's)."""
    lines = []
    if profile == "quick":
        lines += [f"> {QUICK_NOTE}.", ""]
    spread = "mean ± sd over seeds " + ", ".join(map(str, seeds)) if len(seeds) > 1 else f"seed {seeds[0]}"
    lines += [
        f"| method | paper's claim | measured ({spread}) | reproduced? |",
        "|---|---|---|---|",
    ]
    for r in rows:
        measured = r["measured"].replace("|", "\\|") or "-"
        lines.append(f"| {r['method']} | {r['paper']} | {measured} | **{r['verdict']}** — {r['reason']} |")
    return "\n".join(lines) + "\n"


def reproduce(
    out: Path,
    profile: str = "quick",
    only: list[str] | None = None,
    seeds: int | None = None,
    overrides: list[str] = (),
) -> tuple[list[dict], list[str]]:
    """Run the selected methods' recipes (``seeds`` seeds: 0..n-1; default 1 for quick, 2 for full; the
    profile's overrides, then ``overrides``, then the seed) and write the claims table; returns
    ``(rows, errors)``."""
    if profile not in PROFILES:
        raise ConfigError(f"--profile: {profile!r} is not one of {list(PROFILES)}")
    n_seeds = seeds if seeds is not None else (1 if profile == "quick" else 2)
    if n_seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {n_seeds}")
    if profile == "full" and n_seeds < 2:
        print(
            "warning: the full profile with one seed gives no spread; its table is not evidence",
            file=sys.stderr,
        )
    registry = load_registry()
    methods = registry.select(only)
    seed_list = list(range(n_seeds))
    recipes = list(dict.fromkeys(m.recipe for m in methods if m.recipe is not None))
    loaded = {}
    for name in recipes:  # every recipe and override is checked before anything trains
        settings = getattr(registry.recipes[name], profile)
        for seed in seed_list:
            extra = [*settings.overrides, *overrides, f"train.seed={seed}"]
            loaded[name, seed] = load_recipe(resolve_recipe(name), extra)
    plan = [
        (name, seed, 60 * getattr(registry.recipes[name], profile).minutes)
        for name in recipes
        for seed in seed_list
    ]
    progress = Progress(plan)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    errors: list[str] = []
    for index, (name, seed, _) in enumerate(plan):
        recipe, run_dir = loaded[name, seed], run_dir_of(out, name, seed)
        n = len(recipe.stages)

        def on_stage(i: int, stage: StageConfig, index: int = index, n: int = n) -> None:
            progress.line(index, f"stage {i + 1}/{n} {stage.name}", i / n)

        progress.line(index, f"starting ({n} stages) in {run_dir}")
        start = time.perf_counter()
        trained, stage_seconds = True, 0.0
        try:
            results = run_recipe(recipe, run_dir, on_stage=on_stage)
            trained = not all(s.get("skipped") for s in results["stages"].values())
            stage_seconds = sum(s["time_s"] for s in results["stages"].values())
            state = "done"
        except Exception as err:  # reported in the table; the other recipes still run
            state = f"failed: {type(err).__name__}: {err}"
            errors.append(f"{name} seed {seed}: {state}")
            print(f"[reproduce] {name} seed {seed} {state} (the other recipes still run)", file=sys.stderr)
        seconds = time.perf_counter() - start
        if trained:
            progress.finished(index, seconds)
        runs[f"{name}/seed-{seed}"] = {
            "state": state,
            "seconds": round(seconds, 1),  # this call's wall time (a resumed run skips finished stages)
            "stage_seconds": round(stage_seconds, 1),  # the stages' training time, whenever they ran
            "dir": str(run_dir),
        }
    rows = [_row(m, out, seed_list, runs) for m in methods]
    summary = {
        "profile": profile,
        "note": QUICK_NOTE if profile == "quick" else "full profile: the recipes as shipped",
        "seeds": seed_list,
        "methods": [m.method for m in methods],
        "runs": runs,
        "total_seconds": round(time.perf_counter() - progress.start, 1),
        "environment": environment(),
    }
    write_atomic(out / "claims.json", json.dumps(rows, indent=1, ensure_ascii=False))
    write_atomic(out / "claims.md", claims_markdown(rows, profile, seed_list))
    write_atomic(out / "reproduce.json", json.dumps(summary, indent=1, ensure_ascii=False))
    return rows, errors


def _row(method: Method, out: Path, seeds: list[int], runs: dict[str, dict]) -> dict:
    if method.recipe is None:
        return judge(method, {}, seeds)
    failed = [
        f"seed {s} {r['state']}" for s in seeds if (r := runs[f"{method.recipe}/seed-{s}"])["state"] != "done"
    ]
    if failed:
        row = judge(method, {}, seeds)
        return {**row, "verdict": "failed", "reason": "; ".join(failed)}
    metrics = {s: m for s in seeds if (m := _results_metrics(run_dir_of(out, method.recipe, s))) is not None}
    return judge(method, metrics, seeds)


def format_claims(rows: list[dict], profile: str) -> str:
    """The claims table for a terminal: method, verdict and the checks, one per line."""
    lines = [f"Claims ({profile} profile)"]
    if profile == "quick":
        lines.append(QUICK_NOTE)
    for r in rows:
        lines.append(f"{r['method']:<24} {r['verdict']:<9} {r['recipe'] or ''}")
        for c in r["checks"]:
            lines.append(f"    {MARKS[c['state']]} {c['label']}: {c['detail']}")
        if not r["checks"]:
            lines.append(f"    {r['reason']}")
    return "\n".join(lines)
