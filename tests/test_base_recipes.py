"""Every shipped ``<method>/base.yaml`` (a method at its paper's size: hub checkpoints, real data under
``/data``, several GPUs) validates. Nothing here downloads or trains:

* as shipped: the recipe and every stage's task schemas are strict (a misspelt key anywhere fails), every
  model reference is an earlier stage, an absolute path or a hub id (``org/name``), and every data source is
  a real one under the ``/data`` root the user edits;
* with tiny stand-ins swapped in through ``key.path=value`` overrides (the tiny recipes' model configs, the
  world instead of ``/data``): the runner's pre-flight (:func:`mmfactory.runner.preflight`, what
  ``mmfactory run`` checks before anything trains) passes.
"""

import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from mmfactory.config import ConfigError, load_recipe, to_dict
from mmfactory.data.sources import stage_sources
from mmfactory.recipes import RECIPE_DIR, list_recipes, resolve_recipe
from mmfactory.runner import preflight
from mmfactory.tasks import validate_stage

BASES = [name for name in list_recipes() if name.endswith("/base")]
# the methods with a tiny recipe; lm/tiny is the package's smallest recipe, not a paper's method
METHODS = sorted(p.parent.name for p in RECIPE_DIR.glob("*/tiny.yaml") if p.parent.name != "lm")
DATA_ROOT = "/data/"
# keys of a stage's model section (at any depth) whose value names a model: a folder, a hub id or a stage
REFERENCE_KEYS = {"path", "tokenizer", "vision_init", "vq", "text_encoder"}
OPTION_REFERENCES = ("teacher", "judge", "text_reference")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def test_every_built_method_has_a_base_recipe():
    assert sorted(name.partition("/")[0] for name in BASES) == METHODS


def model_references(stage, model_cfg, options) -> list[tuple[str, str]]:
    """``(where, value)`` of every model a stage names: in its model section, ``init_from`` and options."""
    found = []

    def walk(node, where: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in REFERENCE_KEYS and isinstance(value, str):
                found.append((f"{where}.{key}", value))
            elif key != "tiny":  # a config built from keyword arguments names nothing
                walk(value, f"{where}.{key}")

    walk(to_dict(model_cfg), "model")
    if stage.init_from is not None:
        found.append(("init_from", stage.init_from))
    for key in OPTION_REFERENCES:
        if getattr(options, key, None) is not None:
            found.append((f"options.{key}", getattr(options, key)))
    return found


def is_hub_id(value: str) -> bool:
    if not HUB_ID.fullmatch(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def validated(recipe):
    """``[(stage, task class, model, data, options)]``, each stage checked against its task's schemas."""
    return [(stage, *validate_stage(stage, i)) for i, stage in enumerate(recipe.stages)]


@pytest.mark.parametrize("name", BASES)
def test_base_recipe_validates_as_shipped(name):
    recipe = load_recipe(resolve_recipe(name))  # strict recipe and stage keys
    assert recipe.name == name
    # the header opens with the line saying it was never run at this size, then the commands that run it
    lines = resolve_recipe(name).read_text().splitlines()
    assert "NOT RUN AT THIS SIZE BY US" in lines[0] and lines[2] == "#"
    commands = " ".join(lines[3 : lines.index("#", 3)])
    assert "torchrun --nproc_per_node 8" in commands or "accelerate launch --num_processes 8" in commands
    earlier: list[str] = []
    for stage, _, model_cfg, data_cfg, options in validated(recipe):
        where = f"{name} {stage.name}"
        for key, value in model_references(stage, model_cfg, options):
            assert value in earlier or Path(value).is_absolute() or is_hub_id(value), (
                f"{where} {key}: {value!r} is neither an earlier stage, an absolute path nor a hub id"
            )
        for list_name, index, source in stage_sources(data_cfg):
            at = f"{where} data.{list_name}[{index}]"
            assert source.format != "world", f"{at}: a base recipe reads real data"
            for key in ("path", "image_root", "video_root", "audio_root", "labels"):
                value = getattr(source, key)
                assert value is None or value.startswith(DATA_ROOT), f"{at}.{key}: {value!r}"
        pool = getattr(data_cfg, "pool", None)
        assert pool is None or pool.startswith(DATA_ROOT), f"{where} data.pool: {pool!r}"
        assert stage.train.precision == "bf16", f"{where}: the papers train in bf16"
        earlier.append(stage.name)


@pytest.mark.parametrize("name", BASES)
def test_a_misspelt_key_in_any_section_of_a_base_recipe_fails(name):
    recipe = load_recipe(resolve_recipe(name))
    for stage in recipe.stages:
        for section in ("model", "data", "options", "optimizer", "schedule", "train"):
            typo = f"stages.{stage.name}.{section}.not_a_setting=1"
            with pytest.raises(ConfigError, match="not_a_setting"):
                validated(load_recipe(resolve_recipe(name), [typo]))


# ------------------------------------------------------------------------------------------------------
# Tiny stand-ins: the model configs of the matching tiny recipes, as override values (YAML flow style)
# ------------------------------------------------------------------------------------------------------

QWEN_CONFIG = (
    "{model_type: qwen2, hidden_size: 96, intermediate_size: 256, num_hidden_layers: 3,"
    " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256,"
    " tie_word_embeddings: true}"
)
SMALL_QWEN_CONFIG = (
    "{model_type: qwen2, hidden_size: 64, intermediate_size: 160, num_hidden_layers: 2,"
    " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512,"
    " tie_word_embeddings: true}"
)
QWEN, SMALL_QWEN = f"{{tiny: {QWEN_CONFIG}}}", f"{{tiny: {SMALL_QWEN_CONFIG}}}"
TOWER = (
    "{tiny: {model_type: clip_vision_model, hidden_size: 96, intermediate_size: 384, num_hidden_layers: 3,"
    " num_attention_heads: 4, image_size: 30, patch_size: 10}}"
)
WHISPER = (
    "{tiny: {d_model: 64, encoder_layers: 2, encoder_attention_heads: 4, encoder_ffn_dim: 256,"
    " num_mel_bins: 80, max_source_positions: 50}}"
)
CLIP = (
    "{vision_config: {hidden_size: 96, intermediate_size: 384, num_hidden_layers: 3, num_attention_heads: 4,"
    " image_size: 30, patch_size: 10}, text_config: {hidden_size: 64, intermediate_size: 128,"
    " num_hidden_layers: 2, num_attention_heads: 4, max_position_embeddings: 64}, projection_dim: 64}"
)
BERT = (
    "{tiny: {model_type: bert, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,"
    " num_attention_heads: 2, max_position_embeddings: 64}, pooling: mean}"
)
MAC_VISION = "{image_size: 32, patch_size: 4, hidden_size: 64, num_layers: 2, num_heads: 4, num_frames: %d}"
AV_PARTS = f"{{vision: {TOWER}, audio: {WHISPER}, lm: {QWEN}, audio_tokens: 10, video_frames: 4}}"
REWARD = f"{{tiny: {CLIP}, fusion: cross, head_hidden: 64, head_layers: 2, head_heads: 4}}"

STAND_INS: dict[str, list[str]] = {
    "llava/base": [f"stages.align.model.vision={TOWER}", f"stages.align.model.lm={QWEN}"],
    "llava_mod/base": [
        f"stages.align.model.vision={TOWER}",
        f"stages.align.model.lm={QWEN}",
        f"stages.student_align.model.vision={TOWER}",
        f"stages.student_align.model.lm={SMALL_QWEN}",
    ],
    "hyperllava/base": [f"stages.align.model.vision={TOWER}", f"stages.align.model.lm={QWEN}"],
    "av_llm/base": [
        f"stages.{s}.model={AV_PARTS}" for s in ("align", "align_no_tokens", "align_video", "align_audio")
    ],
    "arm/base": [
        "defaults.model.encoder={hidden_size: 48, num_layers: 3, image_size: 24, patch_size: 4}",
        "stages.pretrain_arm.model.decoder={hidden_size: 48, num_layers: 2, num_heads: 2}",
        "stages.pretrain_arm.model.cluster_size=2",
        "stages.pretrain_mae.model.decoder={hidden_size: 48, num_layers: 2, num_heads: 2}",
        *(f"stages.{s}.model.image_size=32" for s in ("finetune_arm", "finetune_mae", "finetune_scratch")),
    ],
    "mac/base": [
        "model.vision_init=null",
        f"model.text={BERT}",
        "model.projection_dim=64",
        f"stages.masked.model.vision={MAC_VISION % 4}",
        f"stages.unmasked.model.vision={MAC_VISION % 4}",
        f"stages.image_masked.model.vision={MAC_VISION % 1}",
        f"stages.image_unmasked.model.vision={MAC_VISION % 1}",
    ],
    "filter_align/base": [
        f"stages.reward.model={REWARD}",
        f"stages.itm.model={REWARD}",
        "stages.filter_cosine.init_from=reward",  # the reward model's CLIP towers stand in for OpenAI's
    ],
    "sag/base": [
        f"stages.stylist_alone.model={SMALL_QWEN}",
        f"stages.s_sft.model={{tiny: {SMALL_QWEN_CONFIG}, drafter: {QWEN}}}",
        *(f"stages.{s}.model.drafter={QWEN}" for s in ("c_dpo", "self_improve", "self_improve_2")),
        "data.claim_checker=world",
    ],
    "mars/base": [
        "stages.vq.model={tiny: {hidden_sizes: [32, 64, 64], embed_dim: 16, codebook_size: 256}}",
        "stages.vq.data.image_sizes=[32]",
        f"stages.align.model.lm={QWEN}",
        f"stages.align_full.model.lm={QWEN}",
        *(f"stages.{s}.data.image_size=32" for s in ("align", "refine", "align_full", "refine_full")),
    ],
}
# the world kind standing in for real data, by the sample kind a source list holds
WORLD_KINDS = {
    "chat": "{kind: chat}",
    "image-chat": "{kind: llava}",
    "image-text": "{kind: scenes}",
    "video-text": "{kind: videos}",
    "labelled-image": "{kind: labelled, label: count, max_objects: 4}",
    "preference": "{kind: preference}",
    "article": "{kind: articles}",
    "ranking": "{kind: rankings}",
    "av-chat": "{kind: video_qa}",
}


def world_data(recipe) -> list[str]:
    """Overrides replacing every source list that reads real data by a small world source of its kind, and a
    real pool by a world pool."""
    out = []
    for stage, cls, _, data_cfg, _ in validated(recipe):
        real = {name for name, _, source in stage_sources(data_cfg) if source.format != "world"}
        for name in sorted(real):
            kind = cls.extra_sources.get(name, cls.sample_kind)
            world = yaml.safe_load(WORLD_KINDS[kind])
            source = yaml.safe_dump([{"format": "world", **world, "size": 16}], default_flow_style=True)
            out.append(f"stages.{stage.name}.data.{name}={source.strip()}")
        if getattr(data_cfg, "pool", "world:").partition(":")[0] != "world":
            out.append(f"stages.{stage.name}.data.pool=world:64:0.5")
    return out


@pytest.mark.parametrize("name", BASES)
def test_base_recipe_passes_preflight_with_tiny_stand_ins(name):
    shipped = load_recipe(resolve_recipe(name))
    overrides = STAND_INS[name] + world_data(shipped)
    recipe = load_recipe(resolve_recipe(name), overrides)
    assert [s.name for s in recipe.stages] == [s.name for s in shipped.stages]
    earlier: list[str] = []
    for stage, _, model_cfg, data_cfg, options in validated(recipe):
        # every model now comes from a tiny config or an earlier stage: nothing is fetched or read from /data
        for key, value in model_references(stage, model_cfg, options):
            assert value in earlier, f"{name} {stage.name} {key}: {value!r} has no stand-in"
        assert all(source.format == "world" for _, _, source in stage_sources(data_cfg))
        earlier.append(stage.name)
    preflight(recipe)  # what `mmfactory run` checks before anything trains


def test_preflight_refuses_what_run_refuses(tmp_path):
    name = "llava/base"
    swapped = STAND_INS[name] + world_data(load_recipe(resolve_recipe(name)))
    missing = load_recipe(resolve_recipe(name), STAND_INS[name])  # the /data sources left in
    with pytest.raises(ConfigError, match="/data/LLaVA-Pretrain"):
        preflight(missing)
    unknown = load_recipe(resolve_recipe(name), [*swapped, "stages.instruct.init_from=aling"])
    with pytest.raises(ConfigError, match="aling"):
        preflight(unknown)
