"""Settings that would train wrong in silence, or write outside --output, are refused through the real CLI
before anything trains: exit code 2 and one line naming the key and the fix, no traceback."""

import pytest

from mmfactory.cli import main
from tests.helpers import tiny_sft_recipe, write_recipe


def run(tmp_path, capsys, *overrides, recipe=None) -> tuple[int, list[str]]:
    path = write_recipe(recipe or tiny_sft_recipe(max_steps=2), tmp_path / "r.yaml")
    code = main(["run", str(path), "--output", str(tmp_path / "run"), *overrides])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_grad_norm=-1", "stages[0].train.max_grad_norm: must be > 0 (null: no clipping), got -1"),
        ("schedule.min_lr_ratio=-3", "stages[0].schedule.min_lr_ratio: must be in [0, 1], got -3"),
        ("schedule.warmup_ratio=5", "stages[0].schedule.warmup_ratio: must be in [0, 1], got 5"),
        ("train.max_steps=0", "stages[0].train.max_steps: must be >= 1, got 0"),
        ("train.max_steps=-3", "stages[0].train.max_steps: must be >= 1, got -3"),
        ("optimizer.lr=-1", "stages[0].optimizer.lr: must be > 0, got -1"),
        ("optimizer.betas=[0.9, 1.5]", "stages[0].optimizer.betas: each must be in [0, 1), got [0.9, 1.5]"),
        ("train.save_every=0", "stages[0].train.save_every: must be >= 1 (or null), got 0"),
        (
            "model.tiny.hiden_size=48",
            "stages[0].model.tiny.hiden_size: not a Qwen2Config setting (did you mean 'hidden_size'?)",
        ),
    ],
)
def test_a_setting_that_would_train_wrong_is_refused_in_one_line(tmp_path, capsys, override, message):
    code, err = run(tmp_path, capsys, override)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"mmfactory: configuration error: {message}")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_negative_epochs_are_refused(tmp_path, capsys):
    code, err = run(tmp_path, capsys, recipe=tiny_sft_recipe(max_steps=None, epochs=-1))
    assert code == 2 and err == [
        "mmfactory: configuration error: stages[0].train.epochs: must be > 0, got -1.0"
    ]


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute-stage", "", ".", "a/b"])
def test_a_stage_name_is_a_folder_name_inside_the_output(tmp_path, capsys, name):
    recipe = tiny_sft_recipe(max_steps=2)
    recipe["stages"][0]["name"] = name
    code, err = run(tmp_path, capsys, recipe=recipe)
    assert (
        code == 2 and len(err) == 1 and err[0].startswith("mmfactory: configuration error: stages[0].name:")
    )
    assert "is not a stage name" in err[0] and not (tmp_path / "run").exists()


def test_an_init_from_typo_is_refused_before_the_first_stage_trains(tmp_path, capsys):
    recipe = tiny_sft_recipe(max_steps=2)
    first = recipe["stages"][0]
    recipe["stages"].append({**first, "name": "second", "model": {}, "init_from": "frist"})
    code, err = run(tmp_path, capsys, recipe=recipe)
    assert code == 2 and err == [
        "mmfactory: configuration error: stages[1].init_from: 'frist' is neither an earlier stage (sft), "
        "nor a folder, nor a hub id in the cache or on the hub"
    ]
    assert not (tmp_path / "run").exists()


def test_an_alias_bomb_is_refused(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\nname: bomb\nstages: [*a8]\n")
    assert main(["run", str(tmp_path / "bomb.yaml"), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than 100000 values once its YAML aliases are expanded" in err[0]


def test_a_failed_run_is_one_line_and_the_traceback_comes_with_debug(tmp_path, capsys):
    recipe = tiny_sft_recipe(max_steps=2)
    recipe["stages"][0]["model"] = {"path": str(tmp_path / "no-such-model")}
    code, err = run(tmp_path, capsys, recipe=recipe)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("mmfactory: error: FileNotFoundError: model path") and "--debug" in err[0]
    path = tmp_path / "r.yaml"
    assert main(["--debug", "run", str(path), "--output", str(tmp_path / "run2")]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_missing_data_file_is_refused_before_anything_trains(tmp_path, capsys):
    recipe = tiny_sft_recipe(max_steps=2)
    missing = str(tmp_path / "nowhere.jsonl")
    recipe["stages"].append(
        {
            **recipe["stages"][0],
            "name": "second",
            "data": {"train": [{"format": "messages", "path": missing}]},
        }
    )
    code, err = run(tmp_path, capsys, recipe=recipe)
    assert code == 2 and err == [
        f"mmfactory: configuration error: stages[1].data.train[0].path: {missing!r} does not exist"
    ]
    assert not (tmp_path / "run").exists()  # the first stage did not train
