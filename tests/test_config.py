import copy

import pytest

from mmfactory.config import ConfigError, apply_overrides, parse_override, recipe_from_dict
from mmfactory.tasks import validate_stage
from tests.helpers import tiny_sft_recipe


def _error(raw: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        recipe = recipe_from_dict(raw, overrides)
        for i, stage in enumerate(recipe.stages):
            validate_stage(stage, i)
    return str(err.value)


def test_unknown_key_names_path_and_suggests():
    raw = tiny_sft_recipe()
    raw["stages"][0]["train"] = {"max_step": 5}
    assert _error(raw) == "stages[0].train.max_step: unknown key (did you mean 'max_steps'?)"


def test_unknown_key_in_task_schema_names_path():
    raw = tiny_sft_recipe()
    raw["stages"][0]["data"]["max_lenght"] = 10
    assert _error(raw) == "stages[0].data.max_lenght: unknown key (did you mean 'max_length'?)"


def test_wrong_type_and_bad_literal():
    raw = tiny_sft_recipe(batch_size="eight")
    assert _error(raw) == "stages[0].train.batch_size: expected an integer, got 'eight'"
    raw = tiny_sft_recipe(precision="bf61")
    assert (
        "stages[0].train.precision: 'bf61' is not one of ['no', 'bf16', 'fp16'] (did you mean 'bf16'?)"
        in _error(raw)
    )
    raw = tiny_sft_recipe()
    raw["stages"][0]["task"] = "causal_lm_stf"
    assert "stages[0].task: unknown task 'causal_lm_stf' (did you mean 'causal_lm_sft'?)" in _error(raw)


def test_missing_and_inconsistent_fields():
    raw = tiny_sft_recipe()
    del raw["stages"][0]["task"]
    assert _error(raw) == "stages[0].task: required key is missing"
    raw = tiny_sft_recipe(epochs=1.0)  # max_steps is also set
    assert "stages[0].train.max_steps: set exactly one of" in _error(raw)
    raw = tiny_sft_recipe()
    raw["stages"][0]["init_from"] = "sft"
    assert "stages[0].init_from: stage 'sft' does not run before 'sft'" in _error(raw)


def test_a_disabled_stage_is_left_out_and_may_not_be_initialised_from():
    raw = tiny_sft_recipe()
    second = {**copy.deepcopy(raw["stages"][0]), "name": "more", "init_from": "sft"}
    raw["stages"].append(second)
    assert [s.name for s in recipe_from_dict(raw, ["stages.more.enabled=false"]).stages] == ["sft"]
    error = _error(raw, ["stages.sft.enabled=false"])
    assert "stages[1].init_from: stage 'sft' is disabled" in error and "stages.more.init_from" in error
    kept = recipe_from_dict(raw, ["stages.sft.enabled=false", "stages.more.init_from=null"]).stages
    assert [s.name for s in kept] == ["more"]
    assert _error(raw, ["stages.sft.enabled=false", "stages.more.enabled=false"]).startswith("stages: every")


def test_yaml_exponent_strings_are_accepted_for_floats():
    raw = tiny_sft_recipe()
    raw["defaults"]["optimizer"]["lr"] = "3e-4"  # PyYAML reads 3e-4 (no dot) as a string
    assert recipe_from_dict(raw).stages[0].optimizer.lr == pytest.approx(3e-4)


def test_parse_override_types():
    assert parse_override("train.max_steps=5") == (["train", "max_steps"], 5)
    assert parse_override("optimizer.lr=3.0e-4") == (["optimizer", "lr"], 3e-4)
    assert parse_override("train.shuffle=false") == (["train", "shuffle"], False)
    assert parse_override("frozen=[a.*, b]") == (["frozen"], ["a.*", "b"])
    assert parse_override("init_from=null") == (["init_from"], None)
    assert parse_override("name=a=b") == (["name"], "a=b")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("train.max_steps")


def test_overrides_target_stage_defaults_or_all_stages():
    raw = tiny_sft_recipe()
    raw["stages"].append({**raw["stages"][0], "name": "second"})
    out = apply_overrides(
        raw, ["stages.second.train.max_steps=3", "optimizer.lr=0.5", "defaults.train.seed=7"]
    )
    assert out["stages"][1]["train"] == {"max_steps": 3}
    assert out["stages"][0]["optimizer"] == {"lr": 0.5} and out["stages"][1]["optimizer"] == {"lr": 0.5}
    recipe = recipe_from_dict(raw, ["stages.second.train.max_steps=3", "defaults.train.seed=7"])
    assert [s.train.max_steps for s in recipe.stages] == [12, 3]
    assert [s.train.seed for s in recipe.stages] == [7, 7]  # defaults merge under each stage
    assert recipe.stages[1].train.batch_size == 8
    assert "no stage 'secnd' (did you mean 'second'?)" in _error(raw, ["stages.secnd.train.seed=1"])


def test_shipped_recipes_validate():
    from mmfactory.config import load_recipe
    from mmfactory.recipes import list_recipes, resolve_recipe

    names = list_recipes()
    assert "lm/tiny" in names
    for name in names:
        recipe = load_recipe(resolve_recipe(name))
        for i, stage in enumerate(recipe.stages):
            validate_stage(stage, i)
    with pytest.raises(ConfigError, match="did you mean 'lm/tiny'"):
        resolve_recipe("lm/tiyn")


def test_yaml_anchors_do_not_leak_overrides_between_stages():
    import yaml

    text = """
name: anchors
stages:
  - &base {name: a, task: causal_lm_sft, train: {max_steps: 4}}
  - {<<: *base, name: b}
"""
    recipe = recipe_from_dict(yaml.safe_load(text), ["stages.a.train.max_steps=9"])
    assert [s.train.max_steps for s in recipe.stages] == [9, 4]


def test_compare_lists_metric_names():
    assert recipe_from_dict({**tiny_sft_recipe(), "compare": ["eval_loss"]}).compare == ["eval_loss"]
    assert recipe_from_dict(tiny_sft_recipe()).compare == []
    with pytest.raises(ConfigError, match=r"compare\[0\]: expected a string"):
        recipe_from_dict({**tiny_sft_recipe(), "compare": [{"eval_loss": 1}]})


def test_option_groups_are_strict_validated_and_name_a_moved_flat_key():
    """A stage's options hold nested groups (``causal_lm_sft``: ``eval``, ``lora``): a misspelt key inside
    one names its dotted path, each group's own checks run with its path, and a flat key that moved into a
    group is refused with the group's key as the suggestion."""
    raw = tiny_sft_recipe()
    options = validate_stage(recipe_from_dict(raw, ["options.eval.generate=5"]).stages[0], 0)[3]
    assert (options.eval.generate, options.eval.max_new_tokens, options.lora) == (5, 4, None)
    defaults = validate_stage(recipe_from_dict(raw, ["options={}"]).stages[0], 0)[3]
    assert (defaults.eval.generate, defaults.eval.max_new_tokens) == (64, 48)  # the group's default_factory
    assert _error(raw, ["options.eval.generat=5"]) == (
        "stages[0].options.eval.generat: unknown key (did you mean 'generate'?)"
    )
    assert _error(raw, ["options.eval.generate=-1"]) == (
        "stages[0].options.eval.generate: must be >= 0 (0: no generation), got -1"
    )
    assert _error(raw, ["options.lora.r=0"]) == "stages[0].options.lora.r: must be >= 1, got 0"
    assert _error(raw, ["options={eval_generate: 8}"]) == (
        "stages[0].options.eval_generate: unknown key (did you mean 'eval.generate'?)"
    )
    assert _error(raw, ["options={max_new_tokens: 8}"]) == (
        "stages[0].options.max_new_tokens: unknown key (did you mean 'eval.max_new_tokens'?)"
    )
    assert _error(raw, ["options={nothing_like_it: 8}"]) == (
        "stages[0].options.nothing_like_it: unknown key (known keys: eval, lora)"
    )
