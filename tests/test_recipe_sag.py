"""sag/tiny through the real CLI on an even tinier copy: every stage learns, every stylist stage changes
the stylist, C-DPO starts from the S-SFT stylist as its reference, the frozen LLM's drafts are prepared
artifacts that agree across stages, and NoteBench reports the five systems of the comparison in English
and Chinese, on the in-distribution split and on the split that needs the LLM (the facts as a seller's
message).

(That the frozen LLM stays bit-identical while a stylist trains is checked in tests/sag/test_sag_tasks.py,
where the drafter module is at hand.)"""

import json
import math

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from mmfactory.recipes import resolve_recipe
from tests.helpers import TINY_LM, sag_world, write_recipe

STEPS = {
    "llm": 20,
    "slm": 20,
    "stylist_alone": 15,
    "s_sft": 15,
    "c_dpo": 8,
    "self_improve": 6,
    "self_improve_2": 12,
}
REQUESTS = [
    {"format": "world", "kind": "article_requests", "split": "test", "size": 2, "languages": ["en", "zh"]}
]
SAG_DATA = sag_world(
    24, 2, 3, 3, style_scorer_texts=40, style_scorer={"max_features": 256}, benchmark_needs_llm=REQUESTS
)


def tinier_sag_recipe() -> dict:
    raw = yaml.safe_load(resolve_recipe("sag/tiny").read_text())
    for stage in raw["stages"]:
        name = stage["name"]
        stage["train"] = {**stage.get("train", {}), "max_steps": STEPS[name], "batch_size": 4, "log_every": 1}
        if "tiny" in stage.get("model", {}):
            stage["model"]["tiny"] = dict(TINY_LM)
        if stage["task"] == "causal_lm_sft":  # the stand-in LLM and the small LM
            for source in stage["data"]["train"]:
                source["size"] = 64 if source["kind"] == "chat" else 16
            for source in stage["data"]["eval"]:
                source["size"] = 4
            stage["options"] = {"eval": {"generate": 2, "max_new_tokens": 8}}
        else:
            stage["data"].update(SAG_DATA)
            short = {"draft_max_new_tokens": 24, "article_max_new_tokens": 24}
            stage["options"] = {**stage["options"], "generation": {**stage["options"]["generation"], **short}}
    raw["stages"][4]["optimizer"] = {"lr": 2.0e-3}  # C-DPO: a visible step in 8 updates
    return raw


def _initial_lm() -> dict[str, torch.Tensor]:
    set_seed(0)  # the runner seeds each stage before its task builds the model
    return load_causal_lm(CausalLMConfig(tiny=dict(TINY_LM)))[0].state_dict()


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sag_tiny_through_cli(tmp_path, capsys):
    path = write_recipe(tinier_sag_recipe(), tmp_path / "sag.yaml")
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Results of sag/tiny" in printed and "NoteBench after stage self_improve" in printed

    metrics = json.loads((out / "results.json").read_text())["metrics"]
    for stage in STEPS:
        assert math.isfinite(metrics[f"{stage}/train_loss"])
        records = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r]
        assert sum(losses[-3:]) < sum(losses[:3]), f"{stage} did not learn"  # means of 3 steps
    first_dpo_step = json.loads((out / "c_dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_dpo_step["reward_chosen"] == first_dpo_step["reward_rejected"] == 0.0  # policy == reference

    weights = {s: load_file(out / s / "final" / "model.safetensors") for s in STEPS}
    assert _changed(weights["llm"], _initial_lm()) and _changed(weights["slm"], _initial_lm())
    starts = {"stylist_alone": "slm", "s_sft": "slm", "c_dpo": "s_sft", "self_improve": "c_dpo"}
    starts["self_improve_2"] = "self_improve"
    for stage, start in starts.items():
        assert _changed(weights[stage], weights[start]), f"{stage} did not change the stylist"

    # The frozen LLM drafted the training, self-improvement and both benchmarks' articles (prepared
    # artifacts): a later stage copies an earlier stage's (tests/sag/test_sag_tasks.py), so all agree.
    drafted = sorted({p.parent.name for p in out.glob("*/drafts-*/drafts.jsonl")})
    splits = ["benchmark", "benchmark_needs_llm", "eval", "self_improve", "train"]
    assert drafted == [f"drafts-{split}" for split in splits]
    for split in splits:
        files = sorted(out.glob(f"*/drafts-{split}/drafts.jsonl"))
        assert len({f.read_bytes() for f in files}) == 1, split
    assert not list((out / "stylist_alone").glob("drafts-*"))  # it writes from the facts, no LLM system
    systems = ["stylist_alone: stylist_alone", "s_sft: llm_alone", "s_sft: llm+stylist"]
    systems += ["c_dpo: llm+stylist", "self_improve: llm+stylist", "self_improve_2: llm+stylist"]
    systems += [f"{system}@needs_llm" for system in systems]
    table = (out / "notebench.md").read_text()
    for system in systems:
        assert f"| {system} | en |" in table and f"| {system} | zh |" in table
    stats = json.loads((out / "self_improve" / "self_improve" / "stats.json").read_text())
    assert stats["candidates"] == 3 * 2 * 4 and metrics["self_improve/filter/candidates"] == 24
    assert stats["kept"] == len(
        (out / "self_improve" / "self_improve" / "kept.jsonl").read_text().splitlines()
    )
