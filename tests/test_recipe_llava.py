"""llava/tiny-style training through the real CLI: a tiny CLIP pretrained on the world becomes the tower
(loaded by stage name), projector alignment moves only the projector (tower and LM bit-identical),
instruction tuning moves projector and LM (tower bit-identical) and its loss falls; the result answers
through ``mmfactory generate --image`` and scores through ``mmfactory eval``.

The align stage's loss is only checked to be finite: a random tiny LM's next-token distribution is close to
uniform (loss ~ ln |V|) whatever the projector feeds it, which is why LLaVA aligns with a pretrained LM."""

import json

import numpy as np
import torch
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import load_recipe
from mmfactory.models.lm import CausalLMConfig
from mmfactory.models.mllm import MultimodalLMSpec, build_multimodal_lm
from mmfactory.models.vision import VisionTowerConfig
from mmfactory.recipes import resolve_recipe
from mmfactory.tasks import validate_stage
from tests.helpers import TINY_EVAL, TINY_LM, world_data, write_recipe
from tests.models.test_mllm import TINY_VISION
from tests.test_image_text_contrastive import TINY_CLIP

EVAL = TINY_EVAL


def tiny_llava_recipe() -> dict:
    return {
        "name": "test/llava",
        "defaults": {
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"batch_size": 8, "max_steps": 12, "log_every": 1, "seed": 0},
        },
        "stages": [
            {
                "name": "vision",
                "task": "image_text_contrastive",
                "model": {"tiny": TINY_CLIP},
                "data": world_data(["scenes"], 32, 8, image_size=16),
                "train": {"max_steps": 4},
                "options": {},
            },
            {
                "name": "align",
                "task": "mllm_sft",
                "model": {"vision": {"path": "vision"}, "lm": {"tiny": dict(TINY_LM)}},
                "data": world_data(["captions"], 48, 8, image_size=16, max_length=160),
                "trainable": ["model.projector.*"],
                "optimizer": {"lr": 1.0e-2},
                "options": EVAL,
            },
            {
                "name": "instruct",
                "task": "mllm_sft",
                "init_from": "align",
                "data": world_data(["llava", "vqa"], 48, 8, image_size=16, max_length=160),
                "trainable": ["model.projector.*", "model.language_model.*"],
                "optimizer": {"lr": 5.0e-3},
                "options": EVAL,
            },
        ],
    }


def initial_state(tower: str) -> dict[str, torch.Tensor]:
    set_seed(0)  # the runner seeds each stage before its task builds the model
    spec = MultimodalLMSpec(vision=VisionTowerConfig(path=tower), lm=CausalLMConfig(tiny=dict(TINY_LM)))
    model, _, _ = build_multimodal_lm(spec)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_two_stages_through_cli_learn_and_keep_frozen_parts_bit_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["run", str(write_recipe(tiny_llava_recipe(), tmp_path / "r.yaml")), "--output", str(out)]) == 0
    )
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert np.isfinite([metrics["align/train_loss"], metrics["align/eval_loss"]]).all()
    assert metrics["instruct/train_loss"] < metrics["instruct/train_first_loss"] - 1.0
    for key in (
        "vqa_accuracy",
        "pope_adversarial_f1",
        "caption_cider_d",
        "gen_tokens_per_s",
        "peak_memory_mb",
    ):
        assert np.isfinite(metrics[f"instruct/{key}"]), key

    initial = initial_state(str(out / "vision/final"))
    clip = load_file(out / "vision/final/model.safetensors")
    towers = {k: v for k, v in initial.items() if k.startswith("vision_tower.")}
    assert towers
    assert all(v.equal(clip[k.replace("vision_tower.", "vision_model.", 1)]) for k, v in towers.items())
    align = load_file(out / "align/final/model.safetensors")
    instruct = load_file(out / "instruct/final/model.safetensors")
    assert align.keys() == instruct.keys() and set(align) <= set(initial)
    for name, value in align.items():
        if name.startswith("projector."):
            assert not torch.equal(value, initial[name]), f"trainable {name} did not change in align"
        else:
            assert torch.equal(value, initial[name]), f"frozen {name} changed in align"
    for name, value in instruct.items():
        if name.startswith("vision_tower."):
            assert torch.equal(value, align[name]), f"frozen {name} changed in instruct"
        else:
            assert not torch.equal(value, align[name]), f"trainable {name} did not change in instruct"

    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    model = str(out / "instruct/final")
    capsys.readouterr()
    questions = ["--prompt", "How many objects are there?", "--prompt", "Is there a red star?"]
    assert (
        main(["generate", "--model", model, "--image", str(image), "--max-new-tokens", "3", *questions]) == 0
    )
    printed = capsys.readouterr().out
    assert printed.count(">>> ") == 2 and "Is there a red star?" in printed
    assert (
        main(
            [
                "eval",
                "--model",
                model,
                "--vqa",
                "3",
                "--pope",
                "2",
                "--captions",
                "0",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "vqa_accuracy " in printed and "pope_popular_f1 " in printed and "caption" not in printed


def test_the_shipped_recipe_validates():
    recipe = load_recipe(resolve_recipe("llava/tiny"))
    assert [s.name for s in recipe.stages] == ["vision", "align", "general", "ground", "instruct"]
    for i, stage in enumerate(recipe.stages):
        validate_stage(stage, i)
    assert recipe.stages[1].model["vision"] == {"path": "vision"}  # the tower pretrained in stage 0
    assert recipe.stages[1].trainable == ["model.projector.*"]
    assert [s.init_from for s in recipe.stages[2:]] == ["align", "general", "ground"]
    # grounding trains yes/no existence only; the last stage keeps it in the full mix
    kinds = [{source.get("kind") for source in s.data["train"]} for s in recipe.stages[3:]]
    assert kinds[0] == {"existence_pairs", "pope"} and kinds[0] < kinds[1]


def test_a_llava_file_laid_out_as_llava_expects_trains_through_the_cli(tmp_path, capsys):
    """LLaVA's layout: image paths relative to an image folder, some rows without ``<image>``. With
    ``image_root`` every row is used (tokens prepended, counted); without it the skips are reported with
    examples and the run stops with one line, not a traceback."""
    (tmp_path / "images" / "coco").mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(
            tmp_path / "images" / "coco" / f"{i}.png"
        )
        question = "What colour is it?" if i % 3 else "<image>\nWhat colour is it?"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": f"grey {i}"}]
        rows.append({"id": str(i), "image": f"coco/{i}.png", "conversations": turns})
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "llava.json").write_text(json.dumps(rows))
    llava = {"format": "llava", "path": str(tmp_path / "annotations" / "llava.json")}
    recipe = {
        "name": "test/llava-file",
        "defaults": {"train": {"batch_size": 4, "max_steps": 2, "log_every": 1}},
        "stages": [
            {
                "name": "instruct",
                "task": "mllm_sft",
                "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": dict(TINY_LM)}},
                "data": {"train": [{**llava, "image_root": str(tmp_path / "images")}], "eval": []},
                "options": {"eval": {"vqa": 0, "pope": 0, "captions": 0, "world": None}},
            }
        ],
    }
    path = write_recipe(recipe, tmp_path / "ok.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "results.json").read_text())["stages"]["instruct"]["data"]
    assert report["train/samples"] == 12 and report["train/llava_image_token_prepended"] == 8

    recipe["stages"][0]["data"]["train"] = [{**llava, "on_bad_sample": "skip"}]  # no image_root
    path = write_recipe(recipe, tmp_path / "no_root.yaml")
    capsys.readouterr()
    assert main(["run", str(path), "--output", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "skipped 12 bad samples: missing_file 12" in err and "llava.json, index 0 (id '0')" in err
    assert "mmfactory: bad data: dataset of 0 samples is smaller than one global batch" in err
    assert "Traceback" not in err
