"""Hub ids resolve wherever a local model folder is accepted: from the local cache under HF_HUB_OFFLINE,
through the same loaders a real checkpoint takes (tests never fetch)."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmfactory.cli import main
from mmfactory.models.hub import resolve_model_folder
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from mmfactory.models.vision import VisionTowerConfig, load_vision_tower
from tests.helpers import tiny_sft_recipe, write_recipe

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_as_hub_repo(folder: Path, repo_id: str, cache: Path) -> None:
    """Lay ``folder`` out in ``cache`` as ``huggingface_hub`` does after downloading ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_hub_id_resolves_offline_and_an_uncached_one_is_refused(tmp_path, offline_cache):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cache_as_hub_repo(model, "org/tiny", offline_cache)
    assert (
        resolve_model_folder("org/tiny", "model")
        == offline_cache / "models--org--tiny" / "snapshots" / COMMIT
    )
    with pytest.raises(FileNotFoundError, match="'org/absent': no such folder, and the hub id could not"):
        resolve_model_folder("org/absent", "model")


def test_an_lm_and_a_vision_tower_load_from_hub_ids(tmp_path, offline_cache):
    lm, tokenizer = load_causal_lm(
        CausalLMConfig(
            tiny={
                "model_type": "qwen2",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            }
        )
    )
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    cache_as_hub_repo(tmp_path / "lm", "org/tiny-lm", offline_cache)
    loaded, loaded_tokenizer = load_causal_lm(CausalLMConfig(path="org/tiny-lm"))
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    for name, tensor in load_file(tmp_path / "lm" / "model.safetensors").items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    tower = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )
    )
    tower.save_pretrained(tmp_path / "tower")
    cache_as_hub_repo(tmp_path / "tower", "org/tiny-tower", offline_cache)
    loaded_tower = load_vision_tower(VisionTowerConfig(path="org/tiny-tower"))
    expected, got = tower.state_dict(), loaded_tower.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_init_from_a_hub_id_trains_through_the_cli_and_a_missing_one_is_one_line(
    tmp_path, offline_cache, capsys
):
    first = write_recipe(tiny_sft_recipe(max_steps=2), tmp_path / "first.yaml")
    assert main(["run", str(first), "--output", str(tmp_path / "first")]) == 0
    cache_as_hub_repo(tmp_path / "first" / "sft" / "final", "org/sft-lm", offline_cache)

    recipe = tiny_sft_recipe(max_steps=2)
    stage = recipe["stages"][0]
    stage.pop("model")
    stage["init_from"] = "org/sft-lm"
    second = write_recipe(recipe, tmp_path / "second.yaml")
    assert main(["run", str(second), "--output", str(tmp_path / "second")]) == 0
    assert (tmp_path / "second" / "sft" / "DONE").exists()
    assert "base_model: org/sft-lm\n" in (tmp_path / "second" / "sft" / "final" / "README.md").read_text()
    capsys.readouterr()
    assert main(["generate", "--model", "org/sft-lm", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert ">>> Hi" in capsys.readouterr().out

    stage["init_from"] = "org/absent"
    capsys.readouterr()
    assert (
        main(["run", str(write_recipe(recipe, tmp_path / "third.yaml")), "--output", str(tmp_path / "third")])
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines() == [
        "mmfactory: configuration error: stages[0].init_from: 'org/absent' is neither an earlier stage "
        "(none), nor a folder, nor a hub id in the cache or on the hub"
    ]
