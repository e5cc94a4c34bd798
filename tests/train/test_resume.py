"""A run killed with SIGKILL mid-stage and resumed ends bit-identical to an uninterrupted run."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.helpers import run_and_kill, tiny_sft_recipe, write_recipe


def _cli(recipe, out) -> list[str]:
    return [sys.executable, "-m", "mmfactory.cli", "run", str(recipe), "--output", str(out)]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    # Dropout on, so the restored RNG matters as much as the weights and the optimizer; an EMA of the
    # weights, so the restored buffers matter too.
    recipe = tiny_sft_recipe(max_steps=40, save_every=4, keep_checkpoints=2, log_every=2)
    recipe["stages"][0]["model"]["tiny"]["attention_dropout"] = 0.1
    recipe["defaults"]["train"]["ema_decay"] = 0.9
    path = write_recipe(recipe, tmp_path / "r.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    reference = tmp_path / "reference"
    subprocess.run(_cli(path, reference), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed"
    run_and_kill(_cli(path, resumed), resumed / "sft" / "step-8", env)
    steps = sorted(int(p.name.split("-")[1]) for p in (resumed / "sft").glob("step-*") if "." not in p.name)
    assert steps and steps[-1] < 40

    done = subprocess.run(_cli(path, resumed), check=True, env=env, capture_output=True, text=True)
    assert f"resumed from {resumed / 'sft' / f'step-{steps[-1]}'}" in done.stdout + done.stderr

    a = load_file(reference / "sft/final/model.safetensors")
    b = load_file(resumed / "sft/final/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # metrics.jsonl holds each step once with the same losses, as if never interrupted
    def losses(run):
        records = [json.loads(line) for line in (run / "sft/metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records]

    assert losses(resumed) == losses(reference)
    ema = [
        json.loads((run / "results.json").read_text())["metrics"]["sft/ema_eval_loss"]
        for run in (reference, resumed)
    ]
    assert ema[0] == ema[1]
