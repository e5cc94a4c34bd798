"""``mmfactory recipes show`` prints a recipe that runs as it reads (overrides applied, every stage complete)
and ``recipes cp`` copies a shipped file with its comments, refusing to overwrite."""

import pytest

from mmfactory.cli import main
from mmfactory.config import load_recipe, to_dict
from mmfactory.recipes import list_recipes, resolve_recipe
from mmfactory.tasks import validate_stage


def _stages(recipe) -> list[list]:
    return [
        [to_dict(part) for part in validate_stage(stage, i)[1:]]
        + [to_dict(stage.train), stage.trainable, stage.frozen, stage.init_from, to_dict(stage.optimizer)]
        for i, stage in enumerate(recipe.stages)
    ]


@pytest.mark.parametrize("name", ["av_llm/tiny", "hyperllava/tiny"])
def test_show_prints_a_recipe_that_loads_to_the_same_stages(name, tmp_path, capsys):
    assert main(["recipes", "show", name, "train.max_steps=7", "stages.align.optimizer.lr=0.002"]) == 0
    shown = tmp_path / "shown.yaml"
    shown.write_text(capsys.readouterr().out)
    again, original = (
        load_recipe(shown),
        load_recipe(resolve_recipe(name), ["train.max_steps=7", "stages.align.optimizer.lr=0.002"]),
    )
    assert _stages(again) == _stages(original)
    assert {s.train.max_steps for s in again.stages} == {7}
    assert next(s for s in again.stages if s.name == "align").optimizer.lr == 0.002


def test_show_refuses_a_bad_override(capsys):
    assert main(["recipes", "show", "lm/tiny", "train.max_step=3"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_cp_copies_the_file_with_its_comments_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["recipes", "cp", "av_llm/tiny", str(tmp_path) + "/mine/"]) == 0
    copy = tmp_path / "mine" / "tiny.yaml"
    assert copy.read_text() == resolve_recipe("av_llm/tiny").read_text()
    assert main(["recipes", "cp", "av_llm/tiny", str(copy)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["recipes", "cp", "lm/tiny", str(copy), "--force"]) == 0
    assert load_recipe(copy).name == "lm/tiny"
    capsys.readouterr()
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in list_recipes())
