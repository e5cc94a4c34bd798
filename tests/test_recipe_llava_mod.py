"""LLaVA-MoD's stages through the real CLI on a tiny teacher and student: the mimic stages learn, the student
is upcycled to a sparse MoE (saved and reloaded as such) and distils from the teacher's stored top-k,
preference distillation moves the student, the frozen tower stays bit-identical, and the shipped recipe's
teacher is exactly llava/tiny."""

import json

from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import load_recipe
from mmfactory.models.components.moe import moe_blocks
from mmfactory.models.mllm import MultimodalLM
from mmfactory.recipes import resolve_recipe
from mmfactory.tasks import validate_stage
from tests.helpers import NO_BENCHMARKS, TINY_EVAL, TINY_LM, world_data, write_recipe
from tests.models.test_mllm import TINY_VISION

DATA = world_data(["vqa", "captions"], 48, 8, image_size=16, max_length=128)
EVAL = TINY_EVAL
MLLM_STAGE = {"trainable": ["model.projector.*", "model.language_model.*"], "data": DATA, "options": EVAL}
MOE_TRAINABLE = ["model.projector.*", "model.language_model.model.layers.*.mlp.*"]  # the official set


def tiny_llava_mod_recipe() -> dict:
    student_lm = {**TINY_LM, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3}
    return {
        "name": "test/llava_mod",
        "compare": ["vqa_accuracy", "params_activated_m", "reward_accuracy"],
        "defaults": {
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "optimizer": {"lr": 5.0e-3},
            "train": {"batch_size": 8, "max_steps": 10, "log_every": 1, "seed": 0},
        },
        "stages": [
            {
                "name": "teacher",
                "task": "mllm_sft",
                "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": dict(TINY_LM)}},
                **MLLM_STAGE,
                "trainable": ["*"],
                "train": {"max_steps": 40},
                "options": NO_BENCHMARKS,
            },
            {
                "name": "mimic_dense",
                "task": "mllm_mimic_distill",
                "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": student_lm}},
                **MLLM_STAGE,
                "train": {"max_steps": 40},  # off the uniform start, so the MoE phase has signal to follow
                "options": {**EVAL, "teacher": "teacher", "mode": "kd_only"},
            },
            {
                "name": "mimic_moe",
                "task": "mllm_mimic_distill",
                "init_from": "mimic_dense",
                **MLLM_STAGE,
                "trainable": MOE_TRAINABLE,
                "options": {
                    **EVAL,
                    "teacher": "teacher",
                    "upcycle": {"num_experts": 4, "top_k": 2, "layers": "sparse"},
                    "teacher_topk": 16,
                },
            },
            {
                "name": "preference",
                "task": "mllm_preference_distill",
                "init_from": "mimic_moe",
                **MLLM_STAGE,
                "trainable": MOE_TRAINABLE,
                "data": world_data(["preference"], 24, 4, image_size=16),
                "train": {"batch_size": 4, "max_steps": 6},
                "options": {**EVAL, "teacher": "teacher", "dpo": {"loss": "kto_pair"}},
            },
        ],
    }


def test_llava_mod_stages_through_cli(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tiny_llava_mod_recipe(), tmp_path / "r.yaml")
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    table = capsys.readouterr().out.split("Comparison (test/llava_mod)\n")[1].splitlines()
    assert table[0].split() == ["stage", "vqa_accuracy", "params_activated_m", "reward_accuracy"]
    assert [row.split()[0] for row in table[2:]] == ["teacher", "mimic_dense", "mimic_moe", "preference"]
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    # mimic_moe trains only the FFNs, routers and projector; on this 16-wide student its loss stays flat over
    # a few steps, so its learning is checked by what changed (below).
    assert metrics["mimic_dense/train_loss"] < metrics["mimic_dense/train_first_loss"] - 0.3
    assert metrics["mimic_dense/params_total_m"] == metrics["mimic_dense/params_activated_m"]
    assert metrics["mimic_moe/params_total_m"] > metrics["mimic_moe/params_activated_m"]
    assert metrics["mimic_moe/params_activated_m"] > metrics["mimic_dense/params_total_m"]  # two experts run
    assert 0 <= metrics["preference/caption_chair_i"] <= 100 and "preference/pope_random_f1" in metrics
    assert (out / "mimic_moe/teacher_topk/index.json").is_file()
    assert "mimic_moe/eval_loss" not in metrics  # held-out loss would need the teacher in memory

    student = MultimodalLM.from_pretrained(out / "preference/final")
    assert len(moe_blocks(student)) == 2  # layers 0 and 2 of 3
    teacher = load_file(out / "teacher/final/model.safetensors")
    dense, moe, pref = (
        load_file(out / f"{s}/final/model.safetensors") for s in ("mimic_dense", "mimic_moe", "preference")
    )
    assert moe.keys() == pref.keys() and len(moe) > len(dense)
    for name, value in pref.items():
        if name.startswith("vision_tower."):
            assert value.equal(moe[name]) and value.equal(dense[name]), f"frozen {name} changed"
        elif name.startswith(("projector.", "language_model.model.layers.0.mlp.router")):
            assert not value.equal(moe[name]), f"trainable {name} did not change in preference"
        if ".mlp." not in name and not name.startswith("projector."):
            # Outside the experts, routers and projector, the MoE mimic and preference stages change nothing:
            # attention, norms, embeddings and the head are those mimic_dense left.
            assert value.equal(moe[name]) and value.equal(dense[name]), f"{name} changed outside the FFNs"
    assert not moe["language_model.model.layers.1.mlp.up_proj.weight"].equal(
        dense["language_model.model.layers.1.mlp.up_proj.weight"]
    )  # the dense layer's FFN trains in mimic_moe too (the official `mlp.*` set)
    for name in (
        "language_model.model.layers.0.mlp.experts.0.up_proj.weight",
        "language_model.model.layers.1.mlp.up_proj.weight",
    ):
        assert not moe[name].equal(pref[name]), f"{name} did not train in preference"
    assert not any(
        value.equal(teacher.get(name)) for name, value in dense.items() if name.startswith("projector.")
    )


def test_the_shipped_recipe_validates_and_its_teacher_is_llava_tiny():
    recipe = load_recipe(resolve_recipe("llava_mod/tiny"))
    for i, stage in enumerate(recipe.stages):
        validate_stage(stage, i)
    stages = {s.name: s for s in recipe.stages}
    kinds = {name: {d["kind"] for d in stage.data["train"]} for name, stage in stages.items()}
    # The two mimic phases read different data (general captions and chats, then VQA-style tasks), with the
    # teacher's grounding phase distilled between them; the SFT-only baseline walks the same phases on the
    # same data and steps with labels instead of the teacher.
    vqa_style = {"vqa", "existence_pairs", "yesno_pairs", "pope"}
    assert kinds["mimic_dense"] == {"captions", "llava"} and vqa_style <= kinds["mimic_moe"]
    assert not vqa_style & kinds["mimic_dense"] and "captions" not in kinds["mimic_moe"]
    assert kinds["mimic_ground"] == kinds["ground"] == {"existence_pairs", "pope"}
    phases = {"student_sft": "mimic_dense", "student_ground": "mimic_ground", "student_instruct": "mimic_moe"}
    for sft, mimic in phases.items():
        assert stages[sft].data["train"] == stages[mimic].data["train"]
        assert stages[sft].train.max_steps == stages[mimic].train.max_steps
    assert (
        stages["mimic_moe"].trainable
        == stages["preference"].trainable
        == [
            "model.projector.*",
            "model.language_model.model.layers.*.mlp.*",
        ]
    )
    llava = load_recipe(resolve_recipe("llava/tiny"))
    teacher = {s.name: s for s in recipe.stages[: len(llava.stages)]}
    assert teacher == {s.name: s for s in llava.stages}
    distill = [s for s in recipe.stages if s.task.startswith("mllm_") and "distill" in s.task]
    assert distill and all(s.options["teacher"] == llava.stages[-1].name for s in distill)
    shown = {"vqa_accuracy", "pope_adversarial_f1", "caption_chair_i", "params_activated_m"}
    assert shown <= set(recipe.compare)
