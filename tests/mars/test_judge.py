"""The consistency judge's scores against a naive per-object count, and its loss."""

import torch

from mmfactory.mars.judge import SceneJudge, SceneJudgeConfig, consistency, judge_loss


def _outputs(shape, color):
    """Judge-like logits whose argmax is the given per-cell classes ``[B, 9]``."""
    return {
        "shape": torch.nn.functional.one_hot(shape, 9).float(),
        "color": torch.nn.functional.one_hot(color, 9).float(),
    }


def test_consistency_counts_as_a_person_would():
    asked = torch.zeros(1, 9, 2, dtype=torch.long)
    asked[0, 0] = torch.tensor([1, 2])  # a shape-1 colour-2 object top left
    asked[0, 4] = torch.tensor([3, 3])  # a shape-3 colour-3 object in the centre
    shape = torch.zeros(1, 9, dtype=torch.long)
    color = torch.zeros(1, 9, dtype=torch.long)
    shape[0, 0], color[0, 0] = 1, 2  # right
    shape[0, 4], color[0, 4] = 3, 1  # right shape, wrong colour
    shape[0, 8], color[0, 8] = 2, 2  # an extra object
    scores = consistency(_outputs(shape, color), asked)
    expected = {"position": 1.0, "shape": 1.0, "color": 0.5, "object": 0.5, "count": 0.0, "scene": 0.0}
    assert {k: float(v) for k, v in scores.items()} == expected
    shape[0, 8], color[0, 4] = 0, 3
    assert float(consistency(_outputs(shape, color), asked)["scene"]) == 1.0


def test_judge_learns_a_batch():
    torch.manual_seed(0)
    judge = SceneJudge(SceneJudgeConfig(hidden_sizes=[8, 16]))
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    cells = torch.randint(0, 9, (8, 9, 2))
    background = torch.randint(0, 3, (8,))
    opt = torch.optim.Adam(judge.parameters(), 1e-2)
    first = judge_loss(judge(x), cells, background).item()
    for _ in range(30):
        loss = judge_loss(judge(x), cells, background)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert judge(x)["features"].shape == (8, 16)
