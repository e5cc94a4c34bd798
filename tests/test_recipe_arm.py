"""ARM recipes through the real CLI: AR and MAE pretraining, then fine-tuning from the AR stage with a
frozen patch embedding: losses fall, trainable parameters change, frozen ones stay bit-identical."""

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import StageConfig, deep_merge, from_dict, load_recipe
from mmfactory.recipes import resolve_recipe
from mmfactory.tasks import build_task, validate_stage
from mmfactory.tasks.base import StageContext
from tests.helpers import world_data, write_recipe

ENCODER = {"hidden_size": 32, "num_layers": 2, "image_size": 16, "patch_size": 4}
DECODER = {"hidden_size": 16, "num_layers": 2, "num_heads": 2}


def tiny_arm_recipe() -> dict:
    return {
        "name": "test/arm",
        "defaults": {
            "model": {"encoder": dict(ENCODER)},
            "data": world_data(["labelled"], 64, 16, image_size=16),
            "optimizer": {"lr": 3.0e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"batch_size": 16, "max_steps": 16, "log_every": 1, "seed": 0, "max_grad_norm": 3.0},
        },
        "stages": [
            {"name": "ar", "task": "arm_pretrain", "model": {"decoder": dict(DECODER), "cluster_size": 2}},
            {
                "name": "mae",
                "task": "arm_mae_pretrain",
                "model": {"decoder": dict(DECODER)},
                "train": {"max_steps": 4},
            },
            {
                "name": "ft",
                "task": "arm_finetune",
                "init_from": "ar",
                "model": {"scans": ["forward", "backward"]},
                "frozen": ["model.encoder.patch_embed.*"],
                "data": {
                    "train": world_data(["labelled"], 32, 0, image_size=16)["train"]
                },  # few enough to fit
                "options": {"layer_decay": 0.9, "label_smoothing": 0.0},
                "train": {"max_steps": 30},
            },
        ],
    }


def _initial_state(stage_raw: dict, recipe: dict, tmp_path, outputs=None) -> dict[str, torch.Tensor]:
    """The stage's model as the runner builds it (seeded), before training."""
    stage = from_dict(StageConfig, deep_merge(recipe["defaults"], stage_raw))
    set_seed(stage.train.seed)
    task = build_task(stage, 0, StageContext(tmp_path, tmp_path / "x", dict(outputs or {})))
    return {k: v.clone() for k, v in task.model.state_dict().items()}


def _losses(stage_dir) -> list[float]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_arm_recipe_learns_and_respects_frozen(tmp_path, capsys):
    recipe = tiny_arm_recipe()
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ft/eval_accuracy" in printed and "ar/train_loss_images_per_s" in printed

    metrics = json.loads((out / "results.json").read_text())["metrics"]
    for stage in ("ar", "ft"):
        losses = _losses(out / stage)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert metrics[f"{stage}/train_loss"] < 0.9 * metrics[f"{stage}/train_first_loss"], stage
    assert 0.0 <= metrics["ft/eval_accuracy"] <= 1.0 and metrics["ar/train_loss_images_per_s"] > 0

    ar_initial = _initial_state(recipe["stages"][0], recipe, tmp_path)
    ar_final = load_file(out / "ar/final/model.safetensors")
    assert ar_final.keys() == ar_initial.keys()
    for name, value in ar_final.items():
        assert not torch.equal(value, ar_initial[name]), f"trainable {name} did not change"

    ft_initial = _initial_state(recipe["stages"][2], recipe, tmp_path, {"ar": out / "ar/final"})
    ft_final = load_file(out / "ft/final/model.safetensors")
    for name, value in ft_final.items():
        if name.startswith("encoder.patch_embed."):
            assert torch.equal(value, ft_initial[name]) and torch.equal(value, ar_final[name]), (
                f"frozen {name}"
            )
        else:
            assert not torch.equal(value, ft_initial[name]), f"trainable {name} did not change"
    config = json.loads((out / "ft/final/config.json").read_text())
    assert config["model_type"] == "mmfactory_vision_mamba_classifier" and config["class_names"] == [
        "1",
        "2",
        "3",
        "4",
    ]


@pytest.mark.parametrize("name", ["arm/tiny", "arm/fashion_mnist"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(resolve_recipe(name))
    for i, stage in enumerate(recipe.stages):
        validate_stage(stage, i)
    assert [s.task for s in recipe.stages] == ["arm_pretrain", "arm_mae_pretrain"] + ["arm_finetune"] * 3
    assert {s.init_from for s in recipe.stages[2:]} == {"pretrain_arm", "pretrain_mae", None}


def test_fashion_mnist_recipe_without_the_data_names_the_missing_path(tmp_path, capsys):
    source = "{format: idx, path: /nowhere/train-images-idx3-ubyte.gz, labels: /nowhere/labels.gz}"
    assert main(["run", "arm/fashion_mnist", "--output", str(tmp_path), f"data.train=[{source}]"]) == 2
    err = capsys.readouterr().err
    assert "stages[0].data.train[0].path: '/nowhere/train-images-idx3-ubyte.gz' does not exist" in err


def test_group_by_length_is_refused_for_samples_without_a_length(tmp_path, capsys):
    path = write_recipe(tiny_arm_recipe(), tmp_path / "r.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / "run"), "train.group_by_length=true"]) == 2
    assert "stages.ar.train.group_by_length: arm_pretrain samples have no length" in capsys.readouterr().err
