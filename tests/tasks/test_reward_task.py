"""image_text_reward (Filter & Align's reward model): pairs from rankings with ties, a fresh head that
ranks exactly as the CLIP cosine, the Bradley-Terry loss on the head's rewards (value and gradient), a
save / load round trip, and learning through the real CLI with frozen towers unchanged."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import StageConfig, TrainConfig
from mmfactory.losses.reward import bradley_terry_loss
from mmfactory.models.image_text_scorer import load_scorer
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from tests.helpers import world_data, write_recipe
from tests.test_image_text_contrastive import TINY_CLIP, clip_stage


def make_task(tmp_path, **data):
    stage = StageConfig(
        name="reward",
        task="image_text_reward",
        model={"tiny": TINY_CLIP, "head_hidden": 16},
        data={**world_data(["rankings"], 6, 3), **data},
        train=TrainConfig(max_steps=1, batch_size=4),
    )
    torch.manual_seed(0)
    return build_task(stage, 0, StageContext(tmp_path, tmp_path / "reward"))


def test_rankings_become_pairs_and_ties_can_be_kept_at_one_half(tmp_path):
    strict = make_task(tmp_path)
    half = make_task(tmp_path, ties="half")
    pairs, with_ties = strict.train_dataset(), half.train_dataset()
    assert len(with_ties) > len(pairs) > 0 and {p[3] for p in pairs.pairs} == {1.0}
    assert {p[3] for p in with_ties.pairs} == {1.0, 0.5}
    for ranking, chosen, rejected, target in with_ties.pairs:
        ranks = with_ties.rankings.items[ranking]["ranks"]
        assert ranks[chosen] < ranks[rejected] if target == 1.0 else ranks[chosen] == ranks[rejected]
    assert strict.data_report()["train/rankings"] == 6 and strict.eval_dataset() is not None


def test_a_fresh_head_ranks_as_the_cosine_and_the_loss_is_bradley_terry(tmp_path):
    task = make_task(tmp_path, ties="half")
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    out = task(batch)
    strict = batch["target"] == 1
    assert out["pair_accuracy"] == out["cosine_pair_accuracy"]  # s * cos + a zero MLP
    chosen, rejected, _ = task.rewards(batch)
    reference = bradley_terry_loss(chosen, rejected, target=batch["target"])
    torch.testing.assert_close(out["loss"], reference)
    params = [p for p in task.parameters() if p.requires_grad]
    for a, b in zip(
        torch.autograd.grad(out["loss"], params, allow_unused=True),
        torch.autograd.grad(reference, params, allow_unused=True),
        strict=True,
    ):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b))
    assert strict.any() and not strict.all()


def test_pair_accuracy_per_caption_kind_pair_equals_a_pair_by_pair_count(tmp_path):
    task = make_task(tmp_path)
    with torch.no_grad():
        task.model.head.fusion.mlp[-1].weight.normal_()
    task.eval()
    metrics = task.evaluate()
    pairs = task.eval_dataset()
    wins: dict[str, list[float]] = {}
    with torch.no_grad():
        for i, (ranking, a, b, _) in enumerate(pairs.pairs):
            chosen, rejected, gap = task.rewards(task.collate([pairs[i]]))
            kinds = pairs.rankings.items[ranking]["kinds"]
            count = wins.setdefault(f"{kinds[a]}>{kinds[b]}", [0, 0, 0])
            count[0] += float(chosen > rejected) + 0.5 * float(chosen == rejected)
            count[1] += float(gap > 0) + 0.5 * float(gap == 0)
            count[2] += 1
    assert len(wins) > 3
    for key, (reward, cosine, n) in wins.items():
        assert metrics[f"eval_pair_accuracy/{key}"] == pytest.approx(100 * reward / n)
        assert metrics[f"eval_cosine_pair_accuracy/{key}"] == pytest.approx(100 * cosine / n)
    assert len(metrics) == 2 * len(wins)


def test_the_saved_reward_model_scores_as_the_trained_one(tmp_path):
    task = make_task(tmp_path)
    with torch.no_grad():
        task.model.head.fusion.mlp[-1].weight.normal_()
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in range(4)])
    task.save_pretrained(tmp_path / "saved")
    model, _, _ = load_scorer(tmp_path / "saved")
    args = (batch["pixel_values"], batch["chosen_input_ids"], batch["chosen_attention_mask"])
    torch.testing.assert_close(model.score(*args), task.model.score(*args))


def test_the_reward_model_learns_through_the_cli_with_frozen_towers(tmp_path):
    recipe = {
        "name": "test/reward",
        "defaults": {
            "train": {"batch_size": 32, "log_every": 10, "seed": 0},
            "schedule": {"kind": "constant", "warmup_steps": 0},
        },
        "stages": [
            clip_stage(64, 20, optimizer={"lr": 3.0e-3}),
            {
                "name": "reward",
                "task": "image_text_reward",
                "init_from": "clip",
                "model": {"head_hidden": 32},
                "data": world_data(["rankings"], 48, 16),
                "trainable": ["model.head.*"],
                "optimizer": {"lr": 1.0e-2},
                "train": {"max_steps": 100},
            },
        ],
    }
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 0
    records = [json.loads(line) for line in (out / "reward/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    metrics = json.loads((out / "reward" / "DONE").read_text())["metrics"]
    assert metrics["eval_pair_accuracy"] > metrics["eval_cosine_pair_accuracy"]
    clip = load_file(out / "clip/final/model.safetensors")
    reward = load_file(out / "reward/final/model.safetensors")
    assert clip.keys() == reward.keys() and all(torch.equal(clip[k], reward[k]) for k in clip)  # frozen
    head = load_file(out / "reward/final/reward_head.safetensors")
    assert head["fusion.mlp.2.weight"].abs().sum() > 0  # the output layer started at zero and learned
