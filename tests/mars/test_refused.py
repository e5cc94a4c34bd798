"""MARS settings that would train wrongly are refused when the recipe is validated."""

import pytest

from mmfactory.config import ConfigError, load_recipe
from mmfactory.recipes import resolve_recipe
from mmfactory.tasks import validate_stage


@pytest.mark.parametrize(
    "override, match",
    [
        ("stages.align.options.directions={t2i: 1.0, draw: 0.5}", "directions"),
        ("stages.align.options.cfg_dropout=1.0", "cfg_dropout"),
        ("stages.align.options.sampling.top_p=0.0", "top_p"),
        ("stages.vq.model.tiny={hidden_sizes: [32, 64], codebok_size: 64}", "codebok_size"),
        ("stages.vq.data.image_sizes=[4]", "image_sizes"),
        ("stages.align.model.experts=moe", "experts"),
    ],
)
def test_bad_settings_are_refused_before_training(override, match):
    recipe = load_recipe(resolve_recipe("mars/tiny"), [override])
    with pytest.raises(ConfigError, match=match):
        for i, stage in enumerate(recipe.stages):
            validate_stage(stage, i)
