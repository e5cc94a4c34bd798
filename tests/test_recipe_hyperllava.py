"""HyperLLaVA through the real CLI on tiny configs: experts added to a trained static model learn (loss falls,
the experts' parameters move), what is frozen stays bit-identical (with the LM frozen, every LM weight), the
saved model reloads with its experts, and the MME / MMBench-style benchmarks are scored."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import ConfigError, load_recipe
from mmfactory.recipes import resolve_recipe
from mmfactory.tasks import validate_stage
from tests.helpers import TINY_BENCHMARKS, world_data, write_recipe
from tests.test_recipe_llava import tiny_llava_recipe

EXPERT = {"embed_dim": 8, "hidden_dim": 4, "rank": 4}


def tiny_hyperllava_recipe() -> dict:
    recipe = tiny_llava_recipe()
    recipe["name"] = "test/hyperllava"
    mixed = world_data(["vqa", "yesno_pairs", "choice"], 48, 8, image_size=16, max_length=160)
    # With the LM frozen, and only 12 steps old, the experts' effect is within the batch-to-batch noise of
    # the loss: they train on one batch of 8, seen 40 times, and must fit it.
    one_batch = world_data(["vqa"], 8, 8, image_size=16, max_length=160)
    options = {"eval": {**TINY_BENCHMARKS, "mme": 4, "mmbench": 2}}
    for name, trainable, data in (
        ("both", ["model.projector.*", "model.language_model.*", "model.language_expert.*"], mixed),
        ("experts", ["model.projector.*", "model.language_expert.*"], one_batch),
    ):
        recipe["stages"].append(
            {
                "name": name,
                "task": "mllm_sft",
                "init_from": "instruct",
                "model": {"hyper": {"visual": EXPERT, "language": EXPERT}},
                "data": data,
                "trainable": trainable,
                "optimizer": {"lr": 2.0e-2},
                "train": {"max_steps": 40, "log_every": 10},  # the last loss: a 10-step mean
                "options": options,
            }
        )
    return recipe


def test_experts_learn_and_frozen_parts_stay_bit_identical_through_the_cli(tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tiny_hyperllava_recipe(), tmp_path / "r.yaml")
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    static = load_file(out / "instruct/final/model.safetensors")
    for stage in ("both", "experts"):
        assert metrics[f"{stage}/train_loss"] < metrics[f"{stage}/train_first_loss"], stage
        for key in ("mme_acc", "mme_acc_plus", "mmbench_circular", "mmbench_vanilla", "trainable_params_m"):
            assert 0 <= metrics[f"{stage}/{key}"] <= 100, (stage, key)
        assert metrics[f"{stage}/mmbench_circular"] <= metrics[f"{stage}/mmbench_vanilla"]
        weights = load_file(out / stage / "final/model.safetensors")
        experts = [k for k in weights if k.startswith(("language_expert.", "projector.expert."))]
        assert experts and all(k not in static for k in experts)
        # the up rows of each hypernetwork start at zero: trained, they are not
        for name in (k for k in experts if k.endswith("hyper.2.weight")):
            assert weights[name].abs().sum() > 0, name
        for name, value in static.items():
            new = (
                weights[name.replace("projector.", "projector.base.", 1)]
                if name.startswith("projector.")
                else weights[name]
            )
            tuned = name.startswith("projector.") or (stage == "both" and name.startswith("language_model."))
            assert torch.equal(new, value) != tuned, (
                f"{stage}: {name} {'did not change' if tuned else 'changed'}"
            )
    assert metrics["experts/trainable_params_m"] < metrics["both/trainable_params_m"]
    assert json.loads((out / "experts/final/config.json").read_text())["hyper"]["language"]["rank"] == 4


def test_an_odd_mme_count_is_refused():
    stage = load_recipe(resolve_recipe("hyperllava/tiny"), ["stages.static.options.eval.mme=5"]).stages[4]
    with pytest.raises(ConfigError, match="eval.mme: MME asks two questions per image"):
        validate_stage(stage, 4)


def test_the_shipped_recipe_validates_and_shares_llava_tiny_stages():
    recipe = load_recipe(resolve_recipe("hyperllava/tiny"))
    for i, stage in enumerate(recipe.stages):
        validate_stage(stage, i)
    llava = load_recipe(resolve_recipe("llava/tiny"))
    shared = llava.stages[:-1]  # vision, align, general, ground
    assert recipe.stages[: len(shared)] == shared
    variants = recipe.stages[len(shared) :]
    assert [s.name for s in variants] == ["static", "visual", "language", "both", "lora", "experts"]
    assert {s.init_from for s in variants} == {"ground"}
    assert len({json.dumps(s.data, sort_keys=True) for s in variants}) == 1  # same data for every variant
    assert len({(s.train.max_steps, s.optimizer.lr) for s in variants}) == 1
