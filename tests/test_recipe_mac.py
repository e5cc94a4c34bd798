"""mac/tiny through the real CLI, shrunk: an image tower trains, both video stages start from its vision half
and learn with the temperature fixed, masking cuts the step's FLOPs, retrieval is reported for each, and the
saved model loads back and retrieves its training videos above chance."""

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import ConfigError, load_recipe
from mmfactory.models.dual_encoder import load_dual_encoder
from mmfactory.recipes import resolve_recipe
from mmfactory.tasks import build_task, validate_stage
from mmfactory.tasks.base import StageContext

TRAIN_VIDEOS = 16
OVERRIDES = [
    "stages.image_tower.model.tiny.vision_config={hidden_size: 32, intermediate_size: 64, "
    "num_hidden_layers: 1, "
    "num_attention_heads: 2, image_size: 32, patch_size: 8}",
    "stages.image_tower.data.train=[{format: world, kind: scenes, size: 64, image_size: 32}]",
    "stages.image_tower.data.eval=[{format: world, kind: scenes, split: val, size: 16, image_size: 32}]",
    "stages.image_tower.train.max_steps=20",
    "stages.masked_long.enabled=false",
    "stages.image_masked.enabled=false",
    "stages.image_unmasked.enabled=false",
    "stages.image_masked_long.enabled=false",
    *[
        f"stages.{stage}.{override}"
        for stage in ("masked", "unmasked")
        for override in (
            "model.text.tiny.hidden_size=32",
            "model.text.tiny.intermediate_size=64",
            "model.text.tiny.num_hidden_layers=1",
            f"data.train=[{{format: world, kind: videos, size: {TRAIN_VIDEOS}}}]",
            "data.eval=[{format: world, kind: videos, split: val, size: 8}]",
            "train.max_steps=60",
            "options.profile_steps=1",
        )
    ],
    "train.batch_size=16",
    "train.log_every=1",
    "optimizer.lr=3.0e-3",
]


@pytest.fixture
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy 2-core machine two threads made
    this test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mac_tiny_through_cli(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["run", "mac/tiny", "--output", str(out), *OVERRIDES]) == 0
    printed = capsys.readouterr().out
    assert "Results of mac/tiny" in printed and "masked/t2v_R@1" in printed and "unmasked/t2v_R@1" in printed
    metrics = json.loads((out / "results.json").read_text())["metrics"]

    recipe = load_recipe(resolve_recipe("mac/tiny"), OVERRIDES)
    masked_stage = next(s for s in recipe.stages if s.name == "masked")
    _, spec, _, _ = validate_stage(masked_stage, 1)
    set_seed(0)  # the runner seeds each stage before its task builds the model
    tower = out / "image_tower" / "final"
    initial = load_dual_encoder(spec, vision_init=tower)[0].state_dict()
    assert initial["log_logit_scale"].exp().item() == pytest.approx(20.0)
    finals = {}
    for stage in ("masked", "unmasked"):
        logged = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        losses = torch.tensor([r["loss"] for r in logged if "loss" in r])
        assert torch.isfinite(losses).all()
        assert losses[-5:].mean() < losses[:5].mean() - 0.3, f"{stage}: the loss did not fall"
        for direction, items in (("t2v", "retrieval_videos"), ("v2t", "retrieval_captions")):
            for k in (1, 5, 10):
                assert 0.0 <= metrics[f"{stage}/{direction}_R@{k}"] <= 100.0
            assert 1.0 <= metrics[f"{stage}/{direction}_MdR"] <= metrics[f"{stage}/{items}"]
        finals[stage] = load_file(out / stage / "final" / "model.safetensors")
        # every weight trains from its start; the temperature is fixed
        for name, value in finals[stage].items():
            if name == "log_logit_scale":
                assert torch.equal(value, initial[name]), f"{stage}: the fixed temperature moved"
            else:
                assert not torch.equal(value, initial[name]), f"{stage}: {name} did not change"
    assert metrics["masked/step_gflops"] < 0.4 * metrics["unmasked/step_gflops"]
    # Both video stages took their encoder's shape from the image tower (the recipe sets none of it).
    for stage in ("masked", "unmasked"):
        vision = json.loads((out / stage / "final" / "config.json").read_text())["vision_config"]
        assert (vision["hidden_size"], vision["patch_size"], vision["num_layers"]) == (32, 8, 1)
        assert vision["pre_norm"] and vision["hidden_act"] == "quick_gelu"

    # The saved model loads through init_from and retrieves the videos it was trained on above chance.
    stage = masked_stage
    stage.init_from = str(out / "masked" / "final")
    with pytest.raises(ConfigError, match="vision_init: init_from already loads the whole model"):
        build_task(stage, 0, StageContext(out, out / "reload", {"image_tower": tower}))
    stage.model = {**stage.model, "vision_init": None}
    task = build_task(stage, 0, StageContext(out, out / "reload")).eval()
    train_retrieval = task.retrieval(task.videos("train"))
    chance = 100.0 / TRAIN_VIDEOS
    assert train_retrieval["t2v_R@1"] > 2 * chance and train_retrieval["v2t_R@1"] > 2 * chance
