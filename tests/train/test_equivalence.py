"""The optimizer step does not depend on how the global batch is split: 1x8 == 8x1, 1 == 2 processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmfactory.cli import main
from tests.helpers import tiny_sft_recipe, write_recipe


def _final(run):
    return load_file(run / "sft/final/model.safetensors")


def _assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, f"max parameter difference {worst}"


def _train_in_process(tmp_path, name, **train):
    path = write_recipe(tiny_sft_recipe(max_steps=4, **train), tmp_path / f"{name}.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / name)]) == 0
    return _final(tmp_path / name)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, group_by_length):
    # Samples differ in length, so only token-weighted accumulation makes these equal.
    big = _train_in_process(tmp_path, "b8", batch_size=8, grad_accum=1, group_by_length=group_by_length)
    small = _train_in_process(tmp_path, "b1", batch_size=1, grad_accum=8, group_by_length=group_by_length)
    _assert_close(big, small, atol=2e-5)
    if group_by_length:  # 4 x 2 micro-batches of sorted samples: still the same step
        pairs = _train_in_process(tmp_path, "b2", batch_size=2, grad_accum=4, group_by_length=True)
        _assert_close(big, pairs, atol=2e-5)
        return
    different = _train_in_process(tmp_path, "b4", batch_size=4, grad_accum=1)  # a different global batch
    with pytest.raises(AssertionError):
        _assert_close(big, different, atol=2e-5)


REPO = Path(__file__).resolve().parents[2]


def _launcher(name: str, port: int) -> list[str]:
    """Two processes of ``python -m mmfactory.cli``: torchrun, or accelerate with the shipped DDP config."""
    bin_dir = os.path.dirname(sys.executable)
    if name == "torchrun":
        return [shutil.which("torchrun", path=bin_dir), "--nproc_per_node", "2", "--master_port", str(port)]
    config = REPO / "configs/accelerate/ddp.yaml"
    accelerate = shutil.which("accelerate", path=bin_dir)
    return [accelerate, "launch", "--config_file", str(config), "--num_processes", "2"] + [
        "--main_process_port",
        str(port),
    ]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher, port", [("torchrun", 29531), ("accelerate-ddp-config", 29535)])
def test_two_processes_equal_one_at_the_same_global_batch(tmp_path, launcher, port):
    one = _train_in_process(tmp_path, "one", batch_size=8)
    path = write_recipe(tiny_sft_recipe(max_steps=4, batch_size=4), tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*_launcher(launcher, port), "-m", "mmfactory.cli", "run", str(path)]
    proc = subprocess.run([*cmd, "--output", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft/train_loss" in proc.stdout and proc.stdout.count("Results of") == 1  # printed once
    _assert_close(one, _final(tmp_path / "two"), atol=2e-5)


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(
    "variables, train, message",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}, "DeepSpeed is not supported yet"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, "FSDP version 1 is not supported"),
        (FSDP2, {"ema_decay": 0.9}, "stages[0].train.ema_decay: a weight EMA is not supported under FSDP"),
    ],
)
def test_an_unsupported_engine_is_refused_before_anything_trains(
    tmp_path, monkeypatch, capsys, variables, train, message
):
    """DeepSpeed (its shards are not saved yet), FSDP1, and FSDP2 with a weight EMA stop in one line before
    any stage trains; FSDP2 itself trains (tests/train/test_fsdp.py)."""
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    path = write_recipe(tiny_sft_recipe(max_steps=2, **train), tmp_path / "r.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "configs/accelerate/" in err, err
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.distributed
def test_the_two_machine_config_trains_as_one_process(tmp_path):
    """configs/accelerate/ddp-2nodes.yaml, as two machines of one process each on this machine (two
    launchers, machine ranks 0 and 1, the main one at 127.0.0.1), trains as one process on their batch."""
    one = _train_in_process(tmp_path, "one", batch_size=8)
    path = write_recipe(tiny_sft_recipe(max_steps=4, batch_size=4), tmp_path / "two.yaml")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    config = REPO / "configs/accelerate/ddp-2nodes.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [
        subprocess.Popen(
            [
                accelerate,
                "launch",
                "--config_file",
                str(config),
                "--num_machines",
                "2",
                "--num_processes",
                "2",
            ]
            + ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", "29539"]
            + ["-m", "mmfactory.cli", "run", str(path), "--output", str(tmp_path / "two")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for machine in machines:
        out, err = machine.communicate(timeout=300)
        assert machine.returncode == 0, err[-3000:]
    _assert_close(one, _final(tmp_path / "two"), atol=2e-5)
