"""LLaVA-MoD's prepare steps under two processes (torchrun, gloo): the main process writes the stored top-k
and the on-policy pairs while the other waits and reads them; both equal those of a one-process run, byte
for byte, and no temporary folder is left."""

import os
import shutil
import subprocess
import sys

import pytest

from mmfactory.artifacts import FINGERPRINT_FILE
from mmfactory.cli import main
from tests.helpers import TINY_LM, world_data, write_recipe
from tests.models.test_mllm import TINY_VISION, tiny_mllm

EVAL = {"eval": {"vqa": 0, "pope": 0, "captions": 0, "world": None}}


def recipe(batch_size: int, teacher, student) -> dict:
    """A mimic stage with a stored top-k and an on-policy preference stage, both from saved models (so
    that what they prepare does not depend on how earlier training was split over processes)."""
    data = world_data(["vqa", "captions"], 8, 0, image_size=16, max_length=128)
    return {
        "name": "prepare",
        "defaults": {
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"batch_size": batch_size, "max_steps": 1, "seed": 0},
        },
        "stages": [
            {
                "name": "mimic",
                "task": "mllm_mimic_distill",
                "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": dict(TINY_LM)}},
                "data": data,
                "options": {**EVAL, "teacher": str(teacher), "teacher_topk": 8, "teacher_topk_batch_size": 3},
            },
            {
                "name": "pref",
                "task": "mllm_preference_distill",
                "init_from": str(student),
                "data": {
                    "train": [],
                    "eval": [],
                    "prompts": world_data(["vqa", "captions"], 3, 0, image_size=16)["train"],
                    "on_policy": {"samples_per_prompt": 2, "max_new_tokens": 4},
                },
                "options": {**EVAL, "teacher": str(teacher)},
            },
        ],
    }


@pytest.mark.distributed
def test_two_processes_prepare_the_same_artifacts_as_one(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun is installed with torch"
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    for folder, seed in ((teacher, 1), (student, 0)):
        for part in tiny_mllm(seed=seed):
            part.save_pretrained(folder)
    one = tmp_path / "one"
    path = write_recipe(recipe(4, teacher, student), tmp_path / "one.yaml")
    assert main(["run", str(path), "--output", str(one)]) == 0
    two = tmp_path / "two"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "mmfactory.cli", "run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    path = write_recipe(recipe(2, teacher, student), tmp_path / "two.yaml")
    proc = subprocess.run([*cmd, str(path), "--output", str(two)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for artifact in ("mimic/teacher_topk", "pref/on_policy_pairs"):
        names = sorted(p.name for p in (one / artifact).iterdir())
        assert FINGERPRINT_FILE in names and names == sorted(p.name for p in (two / artifact).iterdir())
        for name in names:
            assert (one / artifact / name).read_bytes() == (two / artifact / name).read_bytes(), name
        assert not list((two / artifact).parent.glob(".*.tmp-*"))
