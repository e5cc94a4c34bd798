"""SAG's prepare steps under two processes (torchrun, gloo): the main process drafts with the frozen LLM,
samples and filters the self-improvement round and scores NoteBench while the other waits; every artifact
equals that of a one-process run, byte for byte, and no temporary folder is left. A stage that starts
from an earlier one is named by the same fingerprint on every process (the other process once fell back to
the folder's stamp and refused the main process's artifact)."""

import os
import shutil
import subprocess
import sys

import pytest
from accelerate.utils import set_seed

from mmfactory.artifacts import FINGERPRINT_FILE
from mmfactory.cli import main
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from tests.helpers import TINY_LM, sag_world, write_recipe

GENERATION = {"draft_max_new_tokens": 12, "article_max_new_tokens": 12, "batch_size": 3}


def recipe(batch_size: int, stylist) -> dict:
    """S-SFT (NoteBench of the LLM alone), then a self-improvement round from the saved ``stylist``, the
    drafter built from a seeded tiny config: what these prepare does not depend on how training was split.
    A last round starts from S-SFT: every process must name that stage by the same fingerprint."""
    data = {
        **sag_world(8, 2, 2, 3, style_scorer_texts=16, style_scorer={"max_features": 128}),
        "stylist_input": "draft",
        "max_length": 96,
    }
    model = {"tiny": dict(TINY_LM), "drafter": {"tiny": dict(TINY_LM)}}
    return {
        "name": "sag-prepare",
        "defaults": {
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"batch_size": batch_size, "max_steps": 1, "seed": 0},
        },
        "stages": [
            {
                "name": "s_sft",
                "task": "sag_stylist_sft",
                "model": model,
                "data": data,
                "options": {"systems": ["llm_alone"], "generation": GENERATION},
            },
            _round("self_improve", str(stylist), data),
            _round("from_s_sft", "s_sft", data),
        ],
    }


def _round(name: str, start: str, data: dict) -> dict:
    """A self-improvement stage from ``start`` that keeps every sample (the filters' thresholds at 0)."""
    return {
        "name": name,
        "task": "sag_self_improve",
        "init_from": start,
        "model": {"drafter": {"tiny": dict(TINY_LM)}},
        "data": data,
        "options": {
            "systems": [],
            "generation": GENERATION,
            "sampling": {"candidates": 2, "temperature": 1.0},
            "filter": {"min_style_score": 0.0, "min_fact_recall": 0.0},
        },
    }


def _artifacts(run) -> list:
    return sorted(p.relative_to(run) for p in run.glob("*/*") if (p / FINGERPRINT_FILE).exists())


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_processes_prepare_the_same_sag_artifacts_as_one(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    one, two, stylist = tmp_path / "one", tmp_path / "two", tmp_path / "stylist"
    set_seed(0)
    for part in load_causal_lm(CausalLMConfig(tiny=dict(TINY_LM))):
        part.save_pretrained(stylist)
    path = write_recipe(recipe(4, stylist), tmp_path / "one.yaml")
    assert main(["run", str(path), "--output", str(one)]) == 0
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29537", "-m", "mmfactory.cli", "run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    path = write_recipe(recipe(2, stylist), tmp_path / "two.yaml")
    proc = subprocess.run([*cmd, str(path), "--output", str(two)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifacts = _artifacts(one)
    kinds = {a.name.split("-")[0] for a in artifacts}  # drafts-SPLIT, self_improve, notebench
    assert {"drafts", "self_improve", "notebench"} <= kinds, artifacts
    assert artifacts == _artifacts(two)
    for artifact in artifacts:
        if artifact.parts[0] == "from_s_sft":  # samples of a stylist trained on 1 x 4 or 2 x 2: not bitwise
            continue
        names = sorted(p.name for p in (one / artifact).iterdir())
        assert names == sorted(p.name for p in (two / artifact).iterdir())
        for name in names:
            assert (one / artifact / name).read_bytes() == (two / artifact / name).read_bytes(), (
                artifact / name
            )
        assert not list((two / artifact).parent.glob(".*.tmp-*"))
