"""train.report_to: every tracker receives the scalars metrics.jsonl records, at the same steps; a bad name
or a tracker that is not installed is refused before anything trains."""

import json
import typing

import pytest
from accelerate.tracking import GeneralTracker
from accelerate.utils import LoggerType, is_comet_ml_available
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmfactory.cli import main
from mmfactory.config import ConfigError, ReportTo, StageConfig, TrainConfig, from_dict, recipe_from_dict
from mmfactory.runner import run_recipe
from mmfactory.train.trackers import MetricsLog
from tests.helpers import tiny_sft_recipe, write_recipe


class Recorder(GeneralTracker):
    """A custom tracker that keeps every call it gets."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    @property
    def tracker(self):
        return self.calls

    def start(self):
        self.calls.append(("start", None))

    def store_init_configuration(self, values):
        self.calls.append(("config", values))

    def log(self, values, step=None, **kwargs):
        self.calls.append(("log", (step, dict(values))))

    def finish(self):
        self.calls.append(("finish", None))

    def logged(self) -> list[tuple[int, dict]]:
        return [payload for kind, payload in self.calls if kind == "log"]


def _jsonl(path) -> list[tuple[int, dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r.pop("step"), r) for r in records]


def test_a_custom_tracker_receives_the_same_scalars_as_metrics_jsonl(tmp_path):
    recorder = Recorder()
    run_recipe(
        recipe_from_dict(tiny_sft_recipe(max_steps=4, eval_every=2)), tmp_path / "run", trackers=[recorder]
    )
    logged = recorder.logged()
    assert logged == _jsonl(tmp_path / "run/sft/metrics.jsonl")  # same keys, steps and values
    assert [step for step, values in logged if "eval_loss" in values] == [2, 4]  # periodic and final eval
    assert "train_first_loss" in logged[-1][1]  # the end-of-stage record reaches the trackers too
    assert [kind for kind, _ in recorder.calls] == ["start", "config"] + ["log"] * len(logged) + ["finish"]
    config = recorder.calls[1][1]
    assert config["task"] == "causal_lm_sft" and config["train.max_steps"] == 4
    assert config["train.report_to"] == '["tensorboard", "jsonl"]'  # a list as JSON text
    assert list((tmp_path / "run/sft/tensorboard").glob("events.out.tfevents.*"))  # the default, as before


def test_a_finished_stage_is_reused_when_only_report_to_changed(tmp_path, capsys):
    path = write_recipe(tiny_sft_recipe(max_steps=2), tmp_path / "r.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 0
    assert main(["run", str(path), "--output", str(tmp_path / "run"), "train.report_to=[jsonl]"]) == 0
    assert "already done: skipped" in capsys.readouterr().out  # not refused as another configuration


def test_a_resumed_stage_hides_the_steps_it_redoes_from_jsonl_and_tensorboard_alike(tmp_path):
    stage = StageConfig(name="s", task="-")
    first = MetricsLog(stage, tmp_path, enabled=True)
    first.open(0)
    for step in (1, 2, 3, 4):
        first.log(step, {"loss": float(step)})
    first.close()  # as if killed after step 4, with the newest checkpoint at step 2
    resumed = MetricsLog(stage, tmp_path, enabled=True)
    resumed.open(2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    board = [(e.step, e.value) for e in events.Scalars("loss")]
    assert board == [(s, v["loss"]) for s, v in _jsonl(tmp_path / "metrics.jsonl")]
    assert board == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_report_to_without_jsonl_or_tensorboard_writes_neither(tmp_path):
    stage = StageConfig(name="s", task="-", train=TrainConfig(max_steps=1, report_to=[]))
    recorder = Recorder()
    log = MetricsLog(stage, tmp_path, enabled=True, extra=[recorder])
    log.open(0)
    log.log(1, {"loss": 0.5})
    log.close()
    assert recorder.logged() == [(1, {"loss": 0.5})] and not list(tmp_path.iterdir())


def test_only_the_main_process_reports(tmp_path):
    recorder = Recorder()
    log = MetricsLog(StageConfig(name="s", task="-"), tmp_path, enabled=False, extra=[recorder])
    log.open(0)
    log.log(1, {"loss": 0.5})
    log.close()
    assert recorder.calls == [] and not list(tmp_path.iterdir())


def test_report_to_names_are_checked():
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"report_to": ["jsonl", "wandbb"]}, "stages[0].train")
    assert str(err.value).startswith("stages[0].train.report_to[1]: 'wandbb' is not one of ['tensorboard', ")
    assert str(err.value).endswith("(did you mean 'wandb'?)")
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.train\.report_to: 'jsonl' is listed twice$"):
        from_dict(TrainConfig, {"report_to": ["jsonl", "tensorboard", "jsonl"]}, "stages[0].train")
    assert from_dict(TrainConfig, {}).report_to == ["tensorboard", "jsonl"]
    accelerate_names = {t.value for t in LoggerType} - {"all"}
    assert set(typing.get_args(ReportTo)) - {"jsonl"} <= accelerate_names  # every other name is accelerate's


@pytest.mark.skipif(is_comet_ml_available(), reason="comet_ml is installed here")
def test_a_tracker_that_is_not_installed_is_refused_before_anything_trains(tmp_path, capsys):
    path = write_recipe(tiny_sft_recipe(max_steps=2, report_to=["jsonl", "comet_ml"]), tmp_path / "r.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mmfactory: configuration error: stages[0].train.report_to: 'comet_ml' is not installed "
        "(pip install comet-ml)"
    ]
    assert not (tmp_path / "run").exists()


def test_wandb_offline_receives_the_same_scalars_as_metrics_jsonl(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    received = []
    log = wandb.Run.log

    def spy(run, data, step=None, **kwargs):
        received.append((run.project, run.name, step, dict(data)))
        return log(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy)
    recipe = tiny_sft_recipe(max_steps=3, report_to=["jsonl", "wandb"])
    run_recipe(recipe_from_dict(recipe), tmp_path / "run")
    assert received == [("run", "sft", s, v) for s, v in _jsonl(tmp_path / "run/sft/metrics.jsonl")]
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1  # the local store


@pytest.mark.slow  # mlflow's import alone takes seconds
def test_an_mlflow_local_store_holds_the_same_scalars_as_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 otherwise asks for a database
    recipe = tiny_sft_recipe(max_steps=3, report_to=["jsonl", "mlflow"])
    run_recipe(recipe_from_dict(recipe), tmp_path / "run")
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])  # the --output folder
    assert run.info.run_name == "sft" and run.data.params["train.max_steps"] == "3"
    stored = sorted(
        (m.step, key, m.value)
        for key in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, key)
    )
    records = _jsonl(tmp_path / "run/sft/metrics.jsonl")
    assert stored == sorted((step, key, value) for step, values in records for key, value in values.items())
