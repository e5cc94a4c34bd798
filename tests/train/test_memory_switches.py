"""Memory switches (issue 14): ``train.gradient_checkpointing`` trains exactly as without it and is really on
while training only; a task with no model that supports it is refused before anything trains;
``model.attn_implementation`` reaches the built LM (plain and inside a MultimodalLM) and eager / sdpa train
alike; ``flash_attention_2`` without its package or a GPU is refused in one line; bf16 weights train."""

import json

import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import ConfigError, StageConfig, from_dict
from mmfactory.models.lm import CausalLMConfig, check_attention
from mmfactory.tasks import build_task, validate_stage
from mmfactory.tasks.base import StageContext
from mmfactory.train.loop import enable_gradient_checkpointing
from tests.helpers import TINY_BENCHMARKS, TINY_LM, tiny_sft_recipe, world_data, write_recipe
from tests.models.test_mllm import TINY_VISION
from tests.test_recipe_arm import tiny_arm_recipe

# Checkpointing recomputes each layer's forward with the same ops on the same inputs (non-reentrant, RNG
# state restored), so the gradients should agree to float32 rounding; a few steps of AdamW at lr 3e-3 keep
# any such difference far below this.
GC_ATOL = 1e-6
LM = {**TINY_LM, "attention_dropout": 0.0}  # no dropout: recompute and original see the same numbers


def _mllm_recipe(**train) -> dict:
    return {
        "name": "test/mllm",
        "defaults": {
            "optimizer": {"lr": 3.0e-3},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"batch_size": 4, "max_steps": 3, "log_every": 1, "seed": 0, **train},
        },
        "stages": [
            {
                "name": "sft",
                "task": "mllm_sft",
                "model": {
                    "vision": {"tiny": {**TINY_VISION, "attention_dropout": 0.0}},
                    "lm": {"tiny": dict(LM)},
                },
                "data": world_data(["vqa"], 12, 4, image_size=16, max_length=96),
                "options": {"eval": {**TINY_BENCHMARKS, "vqa": 2, "pope": 0, "captions": 0}},
            }
        ],
    }


def _lm_recipe(**train) -> dict:
    recipe = tiny_sft_recipe(max_steps=4, **train)
    recipe["stages"][0]["model"]["tiny"] = dict(LM)
    return recipe


def _run(tmp_path, name: str, recipe: dict, *overrides: str) -> dict:
    """Run ``recipe`` in-process; its final weights and its DONE summary."""
    path = write_recipe(recipe, tmp_path / f"{name}.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / name), *overrides]) == 0
    stage = tmp_path / name / "sft"
    done = json.loads((stage / "DONE").read_text())
    return {"weights": load_file(stage / "final/model.safetensors"), **done}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts the checkpointed layer forwards (transformers binds ``checkpoint`` when it is switched on) and
    whether autograd was recording in each."""
    calls: list[bool] = []
    original = transformers.modeling_utils.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("kind", ["lm", "mllm"])
def test_gradient_checkpointing_trains_the_same_weights_and_is_on_in_training_only(
    tmp_path, capsys, checkpoint_calls, kind
):
    recipe = _lm_recipe if kind == "lm" else _mllm_recipe
    plain = _run(tmp_path, "plain", recipe())
    assert not checkpoint_calls
    checkpointed = _run(tmp_path, "gc", recipe(gradient_checkpointing=True))
    printed = capsys.readouterr().out
    outer = "model (Qwen2ForCausalLM)" if kind == "lm" else "model (MultimodalLM)"
    assert f"[sft] gradient checkpointing: {outer}\n" in printed  # the outer model only, once

    assert _max_difference(plain["weights"], checkpointed["weights"]) < GC_ATOL
    for key in ("train_loss", "eval_loss"):
        assert checkpointed["metrics"][key] == pytest.approx(plain["metrics"][key], abs=1e-5)
    # Every decoder (and, for the MLLM, encoder) layer was checkpointed in every training forward, and
    # never in evaluation or generation (eval mode, no grad), which therefore ran and kept their cache.
    layers = TINY_LM["num_hidden_layers"] + (0 if kind == "lm" else TINY_VISION["num_hidden_layers"])
    steps = recipe()["defaults"]["train"]["max_steps"]
    assert len(checkpoint_calls) == layers * steps and all(checkpoint_calls)
    generated = "eval_exact_match" if kind == "lm" else "vqa_accuracy"
    assert generated in checkpointed["metrics"], sorted(checkpointed["metrics"])
    config = json.loads((tmp_path / "gc/sft/final/config.json").read_text())
    text = config if kind == "lm" else config["text_config"]
    assert text["use_cache"] is True and "gradient_checkpointing" not in json.dumps(config)


def _stage(raw: dict) -> StageConfig:
    return from_dict(StageConfig, {**raw, "train": {"max_steps": 1, "gradient_checkpointing": True}}, "stage")


def test_the_helper_switches_on_outermost_models_and_covers_the_nested_ones(tmp_path):
    mllm = _stage(_mllm_recipe()["stages"][0])
    task = build_task(mllm, 0, StageContext(tmp_path, tmp_path / "s"))
    assert enable_gradient_checkpointing(task, mllm) == ["model (MultimodalLM)"]
    assert task.model.is_activation_checkpointing
    assert task.model.language_model.is_activation_checkpointing  # covered, not switched on again
    assert task.model.vision_tower.is_activation_checkpointing

    lora = _stage({**_lm_recipe()["stages"][0], "options": {"lora": {"r": 4}}})
    task = build_task(lora, 0, StageContext(tmp_path, tmp_path / "l"))
    (found,) = enable_gradient_checkpointing(task, lora)  # found inside PEFT's wrapper (a plain module)
    assert found.endswith("(Qwen2ForCausalLM)") and found.startswith("model.")


def test_a_task_whose_models_do_not_support_it_is_refused_before_anything_trains(tmp_path, capsys):
    recipe = tiny_arm_recipe()
    recipe["stages"] = recipe["stages"][:1]  # arm_pretrain: a VisionMamba HF model without checkpointing
    path = write_recipe(recipe, tmp_path / "arm.yaml")
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out), "train.gradient_checkpointing=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "stages.ar.train.gradient_checkpointing: no model of task arm_pretrain supports" in err
    assert "(its Hugging Face models: ARMPretrainingModel); set it to false" in err
    assert not (out / "ar/metrics.jsonl").exists() and not (out / "ar/DONE").exists()


def test_a_model_that_refuses_it_is_refused_in_one_line(tmp_path):
    expert = {"embed_dim": 8, "hidden_dim": 4, "rank": 4}
    raw = _mllm_recipe()["stages"][0]
    stage = _stage({**raw, "model": {**raw["model"], "hyper": {"visual": None, "language": expert}}})
    task = build_task(stage, 0, StageContext(tmp_path, tmp_path / "s"))
    with pytest.raises(ConfigError) as err:
        enable_gradient_checkpointing(task, stage)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("stages.sft.train.gradient_checkpointing: model (MultimodalLM): gradient")


# -- attention implementation --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lm", "mllm"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_the_built_lm_uses_the_asked_attention(tmp_path, kind, impl):
    raw = (_lm_recipe if kind == "lm" else _mllm_recipe)()["stages"][0]
    if kind == "lm":
        raw["model"]["attn_implementation"] = impl
    else:
        raw["model"]["lm"]["attn_implementation"] = impl
    stage = from_dict(StageConfig, raw, "stage")
    task = build_task(stage, 0, StageContext(tmp_path, tmp_path / "s"))
    lm = task.model if kind == "lm" else task.model.language_model
    assert lm.config._attn_implementation == impl
    assert all(layer.self_attn.config._attn_implementation == impl for layer in lm.model.layers)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_stage_started_from_a_saved_multimodal_lm_uses_the_asked_attention(tmp_path, impl):
    """A saved model does not record its attention; ``model.lm.attn_implementation`` still reaches it."""
    raw = _mllm_recipe()["stages"][0]
    first = build_task(from_dict(StageConfig, raw, "stage"), 0, StageContext(tmp_path, tmp_path / "s"))
    first.save_pretrained(tmp_path / "saved")
    later = {**raw, "init_from": str(tmp_path / "saved"), "model": {"lm": {"attn_implementation": impl}}}
    task = build_task(from_dict(StageConfig, later, "stage"), 0, StageContext(tmp_path, tmp_path / "s2"))
    lm = task.model.language_model
    assert lm.config._attn_implementation == impl
    assert all(layer.self_attn.config._attn_implementation == impl for layer in lm.model.layers)


def test_eager_and_sdpa_attention_train_alike(tmp_path):
    runs = {
        impl: _run(tmp_path, impl, _lm_recipe(), f"stages.sft.model.attn_implementation={impl}")
        for impl in ("eager", "sdpa")
    }
    eager, sdpa = runs["eager"], runs["sdpa"]
    for key in ("train_first_loss", "train_loss", "eval_loss"):
        assert eager["metrics"][key] == pytest.approx(sdpa["metrics"][key], abs=1e-5)
    assert _max_difference(eager["weights"], sdpa["weights"]) < 2e-5  # 2.5e-6 measured (CPU)


def test_flash_attention_without_its_package_or_a_gpu_is_refused_in_one_line(tmp_path, capsys):
    try:
        check_attention(CausalLMConfig(attn_implementation="flash_attention_2"))
        pytest.skip("flash_attn and a CUDA GPU are here")
    except ConfigError:
        pass
    path = write_recipe(_lm_recipe(), tmp_path / "r.yaml")
    override = "stages.sft.model.attn_implementation=flash_attention_2"
    assert main(["run", str(path), "--output", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "stages[0].model.attn_implementation: flash_attention_2 needs" in err
    assert "pip install flash-attn" in err and "attn_implementation: sdpa" in err
    assert not (tmp_path / "run/sft").exists()  # refused before the stage started

    raw = _mllm_recipe()["stages"][0]
    raw["model"]["lm"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.model\.lm\.attn_implementation: flash_attention_2"):
        validate_stage(from_dict(StageConfig, raw, "stages[0]"), 0)


# -- bf16 weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_bf16_weights_train_and_the_loss_falls(tmp_path, gradient_checkpointing):
    recipe = tiny_sft_recipe(max_steps=12, log_every=1, gradient_checkpointing=gradient_checkpointing)
    recipe["stages"][0]["model"]["dtype"] = "bfloat16"
    run = _run(tmp_path, "bf16", recipe)
    assert all(w.dtype == torch.bfloat16 for w in run["weights"].values())
    metrics = run["metrics"]
    assert metrics["train_loss"] < metrics["train_first_loss"] - 0.5, metrics
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
