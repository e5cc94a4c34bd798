"""FSDP2 (``fully_shard`` through accelerate, the shipped configs/accelerate/fsdp.yaml) on 2 gloo processes:
the shards train as one process does, a run killed mid-stage resumes exactly (under DDP too, with the
shipped ddp.yaml), ``final/`` holds the full weights and loads in one process. For an LM, a multimodal LM
with a frozen tower, and a LLaVA-MoD mimic stage that upcycles the LM to a sparse MoE (an expert no token
reaches on one process must not hang)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mmfactory.cli import main
from tests.helpers import TINY_LM, tiny_sft_recipe, world_data, write_recipe
from tests.models.test_mllm import TINY_VISION, tiny_mllm

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ATOL = 2e-5  # 4 AdamW steps: sums over 2 shards and 2 processes round differently from one process


def _fsdp(path: Path, out: Path, port: int, config: str = "fsdp") -> list[str]:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    config = REPO / f"configs/accelerate/{config}.yaml"
    return [accelerate, "launch", "--config_file", str(config), "--num_processes", "2"] + [
        "--main_process_port",
        str(port),
        "-m",
        "mmfactory.cli",
        "run",
        str(path),
        "--output",
        str(out),
    ]


def _run_fsdp(path: Path, out: Path, port: int, config: str = "fsdp") -> str:
    proc = subprocess.run(
        _fsdp(path, out, port, config), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = "FSDP2: the 2 processes hold shards" in proc.stdout
    assert sharded == (config == "fsdp")  # not silently DDP
    return proc.stdout


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run / stage / "final" / "model.safetensors")


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name  # full tensors, not one process's shard
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < atol, f"max parameter difference {worst}"


def test_an_lm_trained_on_fsdp_shards_equals_one_process_and_loads_in_one(tmp_path):
    one = tmp_path / "one"
    assert (
        main(
            [
                "run",
                str(write_recipe(tiny_sft_recipe(max_steps=4), tmp_path / "1.yaml")),
                "--output",
                str(one),
            ]
        )
        == 0
    )
    two = tmp_path / "two"
    _run_fsdp(write_recipe(tiny_sft_recipe(max_steps=4, batch_size=4), tmp_path / "2.yaml"), two, 29551)
    _assert_close(_weights(one, "sft"), _weights(two, "sft"), ATOL)
    model = AutoModelForCausalLM.from_pretrained(two / "sft" / "final")
    saved = _weights(two, "sft")
    for name, param in model.state_dict().items():
        if name in saved:
            assert torch.equal(param, saved[name]), name
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in saved.values())


def _mllm_recipe(batch_size: int) -> dict:
    return {
        "name": "test/fsdp-mllm",
        "defaults": {
            "optimizer": {"lr": 3.0e-3},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"batch_size": batch_size, "max_steps": 3, "log_every": 1, "seed": 0},
        },
        "stages": [
            {
                "name": "sft",
                "task": "mllm_sft",
                "model": {"vision": {"tiny": dict(TINY_VISION)}, "lm": {"tiny": dict(TINY_LM)}},
                "trainable": ["model.projector.*", "model.language_model.*"],
                "data": world_data(["vqa"], 16, 4, image_size=16, max_length=96),
                "options": {"eval": {"vqa": 2, "pope": 0, "captions": 0, "world": {"image_size": 16}}},
            }
        ],
    }


def test_a_multimodal_lm_with_a_frozen_tower_trains_on_shards_as_in_one_process(tmp_path):
    one = tmp_path / "one"
    assert main(["run", str(write_recipe(_mllm_recipe(8), tmp_path / "1.yaml")), "--output", str(one)]) == 0
    two = tmp_path / "two"
    _run_fsdp(write_recipe(_mllm_recipe(4), tmp_path / "2.yaml"), two, 29553)
    a, b = _weights(one, "sft"), _weights(two, "sft")
    _assert_close(a, b, ATOL)
    # the frozen tower left exactly as built (the same seed builds it in both runs)
    tower = [k for k in a if k.startswith("vision_tower.")]
    assert tower and all(torch.equal(a[k], b[k]) for k in tower)


def _kill_all_when(cmd: list[str], out: Path, when: Path) -> None:
    """Start ``cmd`` and SIGKILL the launcher and every worker (each process whose command line names
    ``out``; the workers are not in the launcher's process group) as soon as ``when`` exists."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not when.is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    for process in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(process.info["cmdline"] or ()):
            process.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (when.parent / "DONE").exists(), "the kill came too late to test resuming"


@pytest.mark.parametrize("config, port", [("fsdp", 29555), ("ddp", 29563)])
def test_a_two_process_run_killed_mid_stage_resumes_exactly(tmp_path, config, port):
    # dropout on: the restored RNG of each process matters as much as the gathered weights and optimizer
    recipe = tiny_sft_recipe(max_steps=12, batch_size=4, save_every=3, keep_checkpoints=2, log_every=1)
    recipe["stages"][0]["model"]["tiny"]["attention_dropout"] = 0.1
    path = write_recipe(recipe, tmp_path / "r.yaml")
    reference = tmp_path / "reference"
    _run_fsdp(path, reference, port, config)
    resumed = tmp_path / "resumed"
    _kill_all_when(_fsdp(path, resumed, port + 2, config), resumed, resumed / "sft" / "step-6")
    time.sleep(1)  # let the killed workers' files settle
    assert not (resumed / "sft" / "DONE").exists()
    out = _run_fsdp(path, resumed, port + 4, config)
    assert "resumed from" in out
    a, b = _weights(reference, "sft"), _weights(resumed, "sft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mimic_recipe(batch_size: int, teacher: Path) -> dict:
    return {
        "name": "test/fsdp-moe",
        "defaults": {
            "optimizer": {"lr": 1.0e-3},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"batch_size": batch_size, "max_steps": 3, "log_every": 1, "seed": 0},
        },
        "stages": [
            {
                "name": "mimic",
                "task": "mllm_mimic_distill",
                "init_from": str(teacher),
                "trainable": ["model.projector.*", "model.language_model.model.layers.*.mlp.*"],
                "data": world_data(["vqa", "captions"], 16, 0, image_size=16, max_length=96),
                "options": {
                    "teacher": str(teacher),
                    "upcycle": {"num_experts": 4, "top_k": 1, "layers": "dense"},
                    # the load-balancing loss is a product of batch means: not the same on 2 x 4 as on 1 x 8
                    "moe": {"aux_weight": 0.0},
                    "eval": {"vqa": 0, "pope": 0, "captions": 0, "world": None},
                },
            }
        ],
    }


def test_a_sparse_moe_mimic_stage_trains_on_shards_as_in_one_process(tmp_path):
    teacher = tmp_path / "teacher"
    for part in tiny_mllm(seed=1):
        part.save_pretrained(teacher)
    one = tmp_path / "one"
    assert (
        main(["run", str(write_recipe(_mimic_recipe(8, teacher), tmp_path / "1.yaml")), "--output", str(one)])
        == 0
    )
    two = tmp_path / "two"
    _run_fsdp(write_recipe(_mimic_recipe(4, teacher), tmp_path / "2.yaml"), two, 29561)
    _assert_close(_weights(one, "mimic"), _weights(two, "mimic"), ATOL)
