"""The claims registry: the shipped one names real recipes, stages and overrides; checks and verdicts
follow their definitions on hand-made results."""

import pytest

from mmfactory.config import ConfigError, load_recipe
from mmfactory.recipes import resolve_recipe
from mmfactory.reproduce.claims import Check, Method, judge, load_registry


def test_shipped_registry_names_real_recipes_stages_and_overrides():
    registry = load_registry()
    built = [m for m in registry.methods if m.recipe is not None]
    assert {m.method for m in registry.methods} >= {
        "SAG", "LLaVA-MoD", "MARS", "ARM", "HyperLLaVA", "Audio-Visual LLM", "Filter & Align", "MAC",
    }  # fmt: skip
    assert all(m.recipe is not None for m in registry.methods)  # every method is built
    for name, profiles in registry.recipes.items():
        for profile in (profiles.quick, profiles.full):
            recipe = load_recipe(resolve_recipe(name), [*profile.overrides, "train.seed=1"])
            assert all(stage.train.seed == 1 for stage in recipe.stages)
    for method in built:
        stages = {s.name for s in load_recipe(resolve_recipe(method.recipe)).stages}
        for check in method.checks:
            for key in check.keys:
                assert key.split("/")[0] in stages, (method.method, check.label, key)


def test_quick_profile_fits_twenty_minutes_by_its_own_estimates():
    registry = load_registry()
    recipes = {m.recipe for m in registry.methods if m.recipe is not None}
    assert sum(registry.recipes[r].quick.minutes for r in recipes) <= 20


def test_registry_refuses_a_malformed_check():
    text = """
recipes: {arm/tiny: {quick: {minutes: 1}, full: {minutes: 3}}}
methods:
  - {method: ARM, paper: x, recipe: arm/tiny, checks: [{label: bad, compare: [a/x, b/x, c/x]}]}
"""
    with pytest.raises(ConfigError, match="compare takes two metric keys"):
        load_registry(text)
    with pytest.raises(ConfigError, match="no profiles"):
        load_registry("recipes: {}\nmethods: [{method: ARM, paper: x, recipe: arm/tiny, checks: []}]")
    with pytest.raises(ConfigError, match="exactly one of compare, ratio, value"):
        load_registry(text.replace("compare: [a/x, b/x, c/x]", "value: a/x, ratio: [a/x, b/x], at_least: 1"))


def test_checks_measure_and_hold_as_defined():
    lower = Check("ppl", compare=["a/ppl", "b/ppl"], direction="lower")
    assert lower.measure({"a/ppl": 3.0, "b/ppl": 5.0}) == -2.0 and lower.holds(-2.0) and not lower.holds(0.0)
    margin = Check("near", compare=["a/r", "b/r"], margin=-5)
    assert margin.holds(-4.9) and not margin.holds(-5.0)
    ratio = Check("flops", ratio=["u/f", "m/f"], at_least=2.5)
    assert ratio.measure({"u/f": 10.0, "m/f": 4.0}) == 2.5 and ratio.holds(2.5) and not ratio.holds(2.49)
    assert ratio.measure({"u/f": 10.0, "m/f": 0.0}) is None
    bar = Check("acc", value="s/acc", at_least=60, at_most=90)
    assert bar.holds(60) and not bar.holds(59.9) and not bar.holds(90.1)
    assert bar.measure({"s/acc": float("nan")}) is None and bar.measure({}) is None


def _method(*checks):
    return Method("M", "claim", "arm/tiny", list(checks))


def test_verdicts_over_seeds():
    up = Check("a beats b", compare=["s/a", "s/b"])
    bar = Check("a over 1", value="s/a", at_least=1.0)
    runs = {0: {"s/a": 2.0, "s/b": 1.0}, 1: {"s/a": 3.0, "s/b": 1.0}}
    row = judge(_method(up, bar), runs, [0, 1])
    assert row["verdict"] == "yes" and [c["state"] for c in row["checks"]] == ["holds", "holds"]
    assert row["checks"][0]["per_seed"] == [1.0, 2.0]
    assert "1.5 ± 0.71" in row["checks"][0]["detail"]  # mean and sample sd of the differences

    mixed = {0: {"s/a": 2.0, "s/b": 1.0}, 1: {"s/a": 0.5, "s/b": 1.0}}
    row = judge(_method(up), mixed, [0, 1])
    assert row["verdict"] == "partly" and row["checks"][0]["state"] == "mixed"

    assert judge(_method(up, bar), {0: {"s/a": 0.5, "s/b": 1.0}}, [0])["verdict"] == "no"
    assert judge(_method(up, bar), {0: {"s/a": 1.5, "s/b": 2.0}}, [0])["verdict"] == "partly"


def test_rows_for_missing_runs_metrics_and_methods():
    up = Check("a beats b", compare=["s/a", "s/b"])
    assert judge(Method("H", "claim"), {}, [0])["verdict"] == "not built"
    row = judge(_method(up), {0: {"s/a": 1.0, "s/b": 0.0}}, [0, 1])
    assert row["verdict"] == "not run" and "[1]" in row["reason"]
    row = judge(_method(up), {0: {"s/a": 1.0}}, [0])
    assert row["verdict"] == "not run" and row["checks"][0]["state"] == "missing"
    assert "s/b" in row["checks"][0]["detail"]


def test_a_rate_left_out_as_not_judged_does_not_count_in_the_verdict():
    rate = Check("fewer contradictions", compare=["b/n/en/factuality_rate", "a/n/en/factuality_rate"])
    up = Check("a beats b", compare=["s/a", "s/b"])
    judged = {
        "s/a": 2.0,
        "s/b": 1.0,
        "a/n/en/factuality_rate": 10.0,
        "a/n/en/judged": 80.0,
        "b/n/en/judged": 0.0,
    }
    row = judge(_method(rate, up), {0: judged}, [0])
    assert row["verdict"] == "yes" and row["checks"][0]["state"] == "not judged"
    assert "b/n/en/factuality_rate" in row["checks"][0]["detail"] and row["reason"].startswith("– ")
    assert judge(_method(rate), {0: judged}, [0])["verdict"] == "not judged"
    del judged["b/n/en/judged"]  # no judged share: the metric is missing, not left out
    assert judge(_method(rate, up), {0: judged}, [0])["verdict"] == "not run"


def test_select_keeps_the_order_asked_for_and_refuses_unknown_names():
    registry = load_registry()
    assert [m.method for m in registry.select(["mac", "Audio-Visual LLM", "ARM"])] == [
        "MAC", "Audio-Visual LLM", "ARM",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="unknown method"):
        registry.select(["MAC", "NoSuch"])
