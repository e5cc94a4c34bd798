"""The image-text scorer (Filter & Align's reward model and the ITM baseline): a fresh head of either
fusion is the scaled CLIP cosine; the cross head ignores padding; saved folders (also of the older
MLP-only format) score as the model did; BLIP's hard-negative mining draws as softmax weights say and never
a match; the matching loss is binary cross-entropy (value and gradient)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmfactory.config import StageConfig, TrainConfig
from mmfactory.models.image_text_scorer import HEAD_CONFIG, HEAD_WEIGHTS, load_scorer
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.tasks.matching import matching_loss, mine_hard_negatives
from tests.helpers import world_data
from tests.test_image_text_contrastive import TINY_CLIP


def reward_task(tmp_path, fusion: str):
    model = {"tiny": TINY_CLIP, "fusion": fusion, "head_hidden": 16, "head_layers": 2, "head_heads": 2}
    stage = StageConfig(
        name="reward",
        task="image_text_reward",
        model=model,
        data=world_data(["rankings"], 4, 0),
        train=TrainConfig(max_steps=1, batch_size=4),
    )
    torch.manual_seed(0)
    return build_task(stage, 0, StageContext(tmp_path, tmp_path / "reward"))


def batch_of(task, n: int = 4) -> dict:
    dataset = task.train_dataset()
    return task.collate([dataset[i] for i in range(n)])


@pytest.mark.parametrize("fusion", ["mlp", "cross"])
def test_a_fresh_head_is_the_scaled_cosine_and_a_saved_one_scores_alike(tmp_path, fusion):
    task = reward_task(tmp_path, fusion)
    batch = batch_of(task)
    args = (batch["pixel_values"], batch["chosen_input_ids"], batch["chosen_attention_mask"])
    model = task.model
    image = model.embed_images(args[0])
    text = model.embed_texts(*args[1:])
    cosine = (image.embedding * text.embedding).sum(-1)
    torch.testing.assert_close(model.score(*args), model.head.cosine_scale * cosine, rtol=0, atol=0)
    with torch.no_grad():
        for p in model.head.fusion.parameters():
            p.normal_(0, 0.3)
    task.save_pretrained(tmp_path / "saved")
    loaded, _, _ = load_scorer(tmp_path / "saved")
    torch.testing.assert_close(loaded.score(*args), model.score(*args))
    assert not torch.allclose(model.score(*args), model.head.cosine_scale * cosine)


def test_the_cross_head_ignores_padding(tmp_path):
    task = reward_task(tmp_path, "cross")
    with torch.no_grad():
        for p in task.model.head.fusion.parameters():
            p.normal_(0, 0.3)
    batch = batch_of(task, 2)
    ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    longer = torch.cat([ids, torch.full((2, 5), task.tokenizer.pad_token_id)], 1)
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], 1)
    image = task.model.embed_images(batch["pixel_values"])
    # The text tower's pooled output does not depend on padding, nor may the head's grounded encoder.
    short = task.model.head(image, task.model.embed_texts(ids, mask))
    padded = task.model.head(image, task.model.embed_texts(longer, longer_mask))
    torch.testing.assert_close(padded, short, rtol=1e-5, atol=1e-5)


def test_a_folder_of_the_older_mlp_only_format_still_loads(tmp_path):
    task = reward_task(tmp_path, "mlp")
    with torch.no_grad():
        task.model.head.fusion.mlp[-1].weight.normal_()
    task.save_pretrained(tmp_path / "saved")
    weights = load_file(tmp_path / "saved" / HEAD_WEIGHTS)
    save_file({k.removeprefix("fusion."): v for k, v in weights.items()}, tmp_path / "saved" / HEAD_WEIGHTS)
    config = json.loads((tmp_path / "saved" / HEAD_CONFIG).read_text())
    (tmp_path / "saved" / HEAD_CONFIG).write_text(
        json.dumps({"dim": config["dim"], "hidden": config["hidden"]})
    )
    batch = batch_of(task)
    args = (batch["pixel_values"], batch["rejected_input_ids"], batch["rejected_attention_mask"])
    loaded, _, _ = load_scorer(tmp_path / "saved")
    torch.testing.assert_close(loaded.score(*args), task.model.score(*args))


def test_hard_negatives_follow_the_softmax_weights_and_are_never_matches():
    similarity = torch.tensor(
        [[5.0, 1.0, 2.0, 0.0], [0.5, 4.0, 0.5, 3.0], [1.0, 1.0, 6.0, 1.0], [2.0, 0.0, 1.0, 5.0]]
    )
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 2] = same[2, 0] = True  # samples 0 and 2 have the same caption
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    counts_t, counts_i = torch.zeros(4, 4), torch.zeros(4, 4)
    for _ in range(draws // 500):
        for _ in range(500):
            t, i = mine_hard_negatives(similarity, same, generator)
            counts_t[torch.arange(4), t] += 1
            counts_i[torch.arange(4), i] += 1
    for counts, sim in ((counts_t, similarity), (counts_i, similarity.T)):
        for row in range(4):
            allowed = [c for c in range(4) if c != row and not same[row, c]]
            expected = torch.zeros(4)
            expected[allowed] = torch.softmax(sim[row, allowed], 0)
            assert counts[row][[c for c in range(4) if c not in allowed]].sum() == 0
            torch.testing.assert_close(counts[row] / draws, expected, atol=0.015, rtol=0)


def test_the_matching_loss_is_binary_cross_entropy():
    positive = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    negatives = torch.tensor([0.3, -2.0, 1.5, 0.0, -0.7, 4.0], requires_grad=True)
    loss = matching_loss(positive, negatives)
    naive = (
        -(
            sum(torch.log(torch.sigmoid(p)) for p in positive)
            + sum(torch.log(1 - torch.sigmoid(n)) for n in negatives)
        )
        / 9
    )
    torch.testing.assert_close(loss, naive)
    grads = torch.autograd.grad(loss, [positive, negatives])
    naive_grads = torch.autograd.grad(naive, [positive, negatives])
    for a, b in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b)
