"""The loop with a minimal task: NaN guard, logging, periodic eval; the loop never names a method."""

import json
from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator

from mmfactory.config import StageConfig, TrainConfig
from mmfactory.tasks.base import StageContext, TrainingTask
from mmfactory.train.loop import NonFiniteLossError, train_stage


@dataclass
class _Empty:
    pass


class Regression(TrainingTask):
    """y = 3x on 64 points; ``nan_at`` makes the loss NaN from that step on."""

    model_config = data_config = options_config = _Empty

    def __init__(self, ctx, nan_at=None):
        super().__init__(None, ctx, _Empty(), _Empty(), _Empty())
        self.linear = torch.nn.Linear(1, 1)
        self.nan_at, self.calls = nan_at, 0
        self.x = torch.linspace(-1, 1, 64).unsqueeze(1)

    def train_dataset(self):
        return list(range(64))

    def eval_dataset(self):
        return list(range(8))

    def collate(self, samples):
        return {"x": self.x[samples]}

    def forward(self, batch):
        self.calls += self.training
        loss = (self.linear(batch["x"]) - 3 * batch["x"]).pow(2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "abs_w": self.linear.weight.detach().abs().squeeze()}


def _stage(**train):
    return StageConfig(name="reg", task="-", train=TrainConfig(**{"max_steps": 20, "batch_size": 8, **train}))


def test_loss_falls_and_metrics_are_logged(tmp_path):
    task = Regression(StageContext(tmp_path, tmp_path))
    stage = _stage(max_steps=40, eval_every=20, log_every=10)
    stage.optimizer.lr = 0.3
    stage.schedule.kind = "constant"
    summary, _ = train_stage(task, stage, tmp_path, Accelerator(cpu=True))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 10, 20, 30, 40]
    assert train[-1]["loss"] < 0.1 * train[0]["loss"]
    assert any("eval_loss" in r and r["step"] == 20 for r in records)  # periodic eval
    assert summary["metrics"]["train_first_loss"] == train[0]["loss"]
    assert "eval_abs_w" in summary["metrics"] and summary["steps"] == 40
    assert list((tmp_path / "tensorboard").iterdir())


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    task = Regression(StageContext(tmp_path, tmp_path), nan_at=7)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 \(micro-batch 1\)"):
        train_stage(task, _stage(grad_accum=2), tmp_path, Accelerator(cpu=True))


def test_weight_ema_follows_the_live_weights_and_reports_its_own_evaluation(tmp_path):
    task = Regression(StageContext(tmp_path, tmp_path))
    seen = []  # the weight each training forward sees: the initial one, then the one after each step
    task.linear.register_forward_pre_hook(
        lambda m, a: seen.append(m.weight.item()) if task.training else None
    )
    stage = _stage(max_steps=12, ema_decay=0.8)
    stage.optimizer.lr = 0.3
    summary, _ = train_stage(task, stage, tmp_path, Accelerator(cpu=True))
    live = seen[1:] + [task.linear.weight.item()]  # after steps 1..12
    shadow = seen[0]
    for weight in live:
        shadow = 0.8 * shadow + 0.2 * weight
    assert task.weight_ema.shadow("linear.weight").item() == pytest.approx(shadow, rel=1e-6)
    assert task.linear.weight.item() == live[-1]  # the live weights are back after the EMA evaluation
    metrics = summary["metrics"]
    assert metrics["ema_eval_abs_w"] == pytest.approx(abs(shadow), rel=1e-6)
    assert metrics["eval_abs_w"] == pytest.approx(abs(live[-1]), rel=1e-6)
    assert "weight_ema.linear__weight" in task.state_dict()  # a buffer: checkpointed with the run
