"""Measured training FLOPs equal the matmul count a person would write down."""

import torch
from torch import nn

from mmfactory.eval.flops import training_step_flops


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(16, 8, bias=False)

    def forward(self, batch):
        return {"loss": self.layer(batch["x"]).square().mean()}


def test_a_linear_step_costs_forward_plus_two_backward_matmuls_and_leaves_no_gradient():
    task = _Linear().eval()
    flops = training_step_flops(task, {"x": torch.randn(4, 16)})
    forward = 2 * 4 * 16 * 8
    assert flops == forward + forward  # the weight gradient; the input needs none
    assert task.layer.weight.grad is None and not task.training
