import pytest
import torch
from torch import nn

from mmfactory.config import OptimizerConfig, ScheduleConfig
from mmfactory.train.optim import build_optimizer, lr_factor, select_trainable


def _model():
    return nn.ModuleDict({"encoder": nn.Linear(3, 3), "head": nn.Linear(3, 2), "norm": nn.LayerNorm(3)})


def test_schedule_warmup_then_cosine_to_min():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, 104, cfg) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_factor(4, 104, cfg) == pytest.approx(1.0)
    assert lr_factor(54, 104, cfg) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_factor(104, 104, cfg) == pytest.approx(0.1)
    linear = ScheduleConfig(kind="linear", warmup_steps=0)
    assert lr_factor(25, 100, linear) == pytest.approx(0.75)
    assert lr_factor(10, 100, ScheduleConfig(kind="constant", warmup_ratio=0.05)) == 1.0


def test_select_trainable_patterns_frozen_wins_and_typos_fail():
    model = _model()
    names = select_trainable(model, ["encoder.*", "head.*"], ["head.bias"])
    assert names == ["encoder.weight", "encoder.bias", "head.weight"]
    assert not model["norm"].weight.requires_grad and not model["head"].bias.requires_grad
    with pytest.raises(ValueError, match="'decoder.\\*' matches no"):
        select_trainable(_model(), ["decoder.*"], [])


def test_no_weight_decay_on_one_dimensional_parameters():
    model = _model()
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.5 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.AdamW)


def test_parameters_marked_no_weight_decay_are_not_decayed():
    model = _model()
    model["encoder"].weight._no_weight_decay = True
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5))
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed == [model["head"].weight]
