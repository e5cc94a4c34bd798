"""LoRA on the text-only LM tasks (SFT and DPO) through the real CLI: only adapters train, ``final/`` holds
the merged model and ``final/adapter`` the adapters alone (base + adapter == merged), the DPO reference is the
policy with its adapters off, and ``mmfactory export --to adapter / merged`` write them out."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mmfactory.cli import main
from tests.helpers import tiny_sft_recipe, world_data, write_recipe

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def test_lora_sft_and_dpo_train_adapters_only_and_export(tmp_path, capsys):
    recipe = tiny_sft_recipe(max_steps=6)
    base = recipe["stages"][0]
    lora_sft = {
        **base,
        "name": "lora_sft",
        "model": {},
        "init_from": "sft",
        "options": {**base["options"], "lora": LORA},
    }
    dpo = {
        "name": "lora_dpo",
        "task": "causal_lm_dpo",
        "init_from": "lora_sft",
        "data": world_data(["article_preference"], 24, 4, languages=["en"], max_length=96),
        "options": {"dpo": {"beta": 0.5}, "lora": LORA},
        "optimizer": {"lr": 1e-2},
    }
    recipe["stages"] = [base, lora_sft, dpo]
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 0

    start = load_file(out / "sft/final/model.safetensors")
    merged = load_file(out / "lora_sft/final/model.safetensors")
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert changed and all(any(m in k for m in LORA["target_modules"]) for k in changed)  # only adapted ones
    assert {k for k in start if "q_proj.weight" in k} <= changed  # every adapted module moved

    # base + the saved adapters == the merged final/
    ids = torch.tensor([[5, 9, 14, 3, 7, 21]])
    merged_model = AutoModelForCausalLM.from_pretrained(out / "lora_sft/final")
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out / "sft/final"), out / "lora_sft/final/adapter"
    )
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged_model(ids).logits, rtol=1e-5, atol=1e-5)

    # DPO: the reference is the starting policy (adapters off, B = 0 at the start): the first loss is log 2
    done = json.loads((out / "lora_dpo/DONE").read_text())
    assert abs(done["metrics"]["train_first_loss"] - 0.6931) < 1e-3
    assert done["metrics"]["train_loss"] < 0.6931  # and the adapters learned to prefer the chosen replies
    dpo_start, dpo_end = merged, load_file(out / "lora_dpo/final/model.safetensors")
    assert {k for k in dpo_start if not torch.equal(dpo_start[k], dpo_end[k])} <= changed

    assert main(["export", str(out / "lora_sft"), "--to", "adapter", "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter/adapter_config.json").is_file()
    assert main(["export", str(out / "lora_sft"), "--to", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged/adapter").exists()
    assert load_file(tmp_path / "merged/model.safetensors").keys() == merged.keys()
    capsys.readouterr()
    assert main(["export", str(out / "sft"), "--to", "adapter", "--out", str(tmp_path / "none")]) == 2
    assert "no adapter/ (only stages trained with options.lora keep one)" in capsys.readouterr().err
