"""Loss and metric curves of a run's stages (matplotlib, no display), as PNG bytes."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

SKIPPED = ("lr", "grad_norm")  # logged every step, but they say little about learning


def read_metrics_log(path: Path) -> list[dict]:
    """The records of a stage's ``metrics.jsonl`` (an unreadable line is named in the error)."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from None
    return records


def stage_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` of the training log: ``loss``, ``eval_loss``, then every other
    per-step metric (throughputs and the learning rate left out)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if "step" not in r:
            continue
        for key, value in r.items():
            if key == "step" or key.startswith("train_") or key in SKIPPED or key.endswith("_per_s"):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                curves.setdefault(key, []).append((int(r["step"]), float(value)))
    ordered = {k: curves[k] for k in ("loss", "eval_loss") if k in curves}
    ordered.update({k: v for k, v in curves.items() if k not in ordered and len(v) > 1})
    return ordered


def curves_png(stages: dict[str, dict[str, list[tuple[int, float]]]], columns: int = 4) -> bytes | None:
    """One subplot per stage: the loss (and eval loss) on the left axis, the first other metric dashed on a
    right axis. None when no stage logged a loss."""
    stages = {name: c for name, c in stages.items() if "loss" in c}
    if not stages:
        return None
    cols = min(columns, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat[len(stages) :]:
        ax.axis("off")
    for ax, (name, curves) in zip(axes.flat, stages.items(), strict=False):
        steps, values = zip(*curves["loss"], strict=True)
        ax.plot(steps, values, color="#1f77b4", linewidth=1.2, label="loss")
        if "eval_loss" in curves:
            steps, values = zip(*curves["eval_loss"], strict=True)
            ax.plot(steps, values, "o-", color="#d62728", markersize=3, linewidth=1, label="eval loss")
        others = [k for k in curves if k not in ("loss", "eval_loss")]
        if others:
            twin = ax.twinx()
            steps, values = zip(*curves[others[0]], strict=True)
            twin.plot(steps, values, "--", color="#2ca02c", linewidth=1, label=others[0])
            twin.tick_params(labelsize=7, colors="#2ca02c")
            twin.set_ylabel(others[0], fontsize=7, color="#2ca02c")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right", frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
