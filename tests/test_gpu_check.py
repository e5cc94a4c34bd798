"""benchmarks/gpu_check.sh --dry-run: every part of the GPU pass runs on the CPU with tiny sizes, so the
script a short GPU lease runs is known to work before the lease; the MFU it reports follows its formula."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PARTS = ("lm_mfu", "recipe_bf16", "bench_moe", "bench_ssm", "bench_t2i", "bench_mac")


def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(REPO / "benchmarks/gpu_check.sh"), "--dry-run", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for part in PARTS:
        assert f"{part}: exit 0" in proc.stdout, (part, (tmp_path / f"{part}.log").read_text()[-2000:])

    mfu = json.loads((tmp_path / "lm_mfu.json").read_text())
    assert mfu["tokens_per_s"] == mfu["tokens_per_step"] / mfu["step_s"]
    assert abs(mfu["mfu"] - 6 * mfu["params"] * mfu["tokens_per_s"] / 1e12 / mfu["peak_tflops"]) < 1e-12
    stage = tmp_path / "run-bf16" / "sft"
    assert (stage / "DONE").is_file()
    assert yaml.safe_load((stage / "config.yaml").read_text())["train"]["precision"] == "bf16"
    assert "(torch fallback)" in (tmp_path / "bench_ssm.log").read_text()  # no mamba-ssm kernels here
