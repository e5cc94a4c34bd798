"""SAG stage options are composed of groups (``systems``, ``generation``, ``lora``, and ``dpo`` for C-DPO,
``sampling`` / ``filter`` / ``previous_rounds`` for self-improvement): the shipped recipes resolve to the
settings they document, and a key of the old flat schema or a misspelt key in a group is refused with its
path before anything runs."""

import pytest

from mmfactory.config import ConfigError, load_recipe
from mmfactory.recipes import resolve_recipe
from mmfactory.sag.config import SAGGenerationOptions, SAGSamplingOptions
from mmfactory.sag.self_improve import FilterConfig
from mmfactory.tasks import validate_stage
from mmfactory.tasks.preference import DPOOptions

# recipe -> the generation group its stylist stages share through the `&options` anchor
GENERATION = {
    "sag/tiny": SAGGenerationOptions(draft_max_new_tokens=64, article_max_new_tokens=72, batch_size=32),
    "sag/smollm2": SAGGenerationOptions(draft_max_new_tokens=80, article_max_new_tokens=72, batch_size=48),
    "sag/base": SAGGenerationOptions(draft_max_new_tokens=512, article_max_new_tokens=512, batch_size=16),
}


def _options(recipe) -> dict:
    return {stage.name: validate_stage(stage, i)[3] for i, stage in enumerate(recipe.stages)}


@pytest.mark.parametrize("name", sorted(GENERATION))
def test_shipped_sag_recipes_resolve_to_their_documented_settings(name):
    options = _options(load_recipe(resolve_recipe(name)))
    sag_stages = [s for s in options if s not in ("llm", "slm")]
    assert sag_stages[:4] == ["stylist_alone", "s_sft", "c_dpo", "self_improve"]
    for stage in sag_stages:  # `<<: *options` carries the generation group to every stylist stage
        assert options[stage].generation == GENERATION[name], stage
        assert options[stage].lora is None
    assert options["stylist_alone"].systems == ["stylist_alone"]
    assert options["s_sft"].systems == ["llm_alone", "llm+stylist"]
    assert options["c_dpo"].dpo == DPOOptions(loss="sigmoid", beta=0.1, sft_weight=1.0)
    rounds = sag_stages[3:]  # the self-improvement rounds: two (tiny, base) or one (smollm2)
    assert [options[s].previous_rounds for s in rounds] == [[], ["self_improve"]][: len(rounds)]
    for stage in rounds:
        opts = options[stage]
        assert opts.systems == ["llm+stylist"]
        assert opts.sampling == SAGSamplingOptions(candidates=4, temperature=0.7, top_p=0.9, top_k=None)
        assert opts.filter == FilterConfig(min_style_score=0.5, min_fact_recall=1.0, keep_per_input=1)
    for stage in ("llm", "slm"):
        if stage in options:  # the stand-in LMs: causal_lm_sft's eval group
            assert options[stage].eval.max_new_tokens == 48 and options[stage].eval.generate in (32, 100)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.c_dpo.options.beta=0.2", "options.beta: unknown key (did you mean 'dpo.beta'?)"),
        ("stages.c_dpo.options.dpo.bta=0.2", "options.dpo.bta: unknown key (did you mean 'beta'?)"),
        ("stages.c_dpo.options.dpo.beta=-1", "options.dpo.beta: must be > 0, got -1.0"),
        ("stages.self_improve.options.candidates=2", "did you mean 'sampling.candidates'?"),
        ("stages.self_improve.options.temperature=0.5", "did you mean 'sampling.temperature'?"),
        ("stages.self_improve.options.sampling.temperature=0", "options.sampling.temperature: must be > 0"),
        ("stages.self_improve.options.sampling.top_p=1.5", "options.sampling.top_p: must be in (0, 1]"),
        (
            "stages.s_sft.options.article_max_new_tokens=9",
            "did you mean 'generation.article_max_new_tokens'?",
        ),
        ("stages.s_sft.options.generation_batch_size=9", "did you mean 'generation.batch_size'?"),
        (
            "stages.s_sft.options.generation.batch_size=0",
            "options.generation.batch_size: must be >= 1, got 0",
        ),
        (
            "stages.slm.options.eval_generate=8",
            "options.eval_generate: unknown key (did you mean 'eval.generate'?)",
        ),
    ],
)
def test_old_flat_keys_and_bad_group_values_are_refused_with_their_path(override, message):
    recipe = load_recipe(resolve_recipe("sag/tiny"), [override])
    with pytest.raises(ConfigError) as err:
        _options(recipe)
    assert message in str(err.value)
    stage = override.split(".")[1]
    assert str(err.value).startswith(f"stages[{[s.name for s in recipe.stages].index(stage)}].options.")
