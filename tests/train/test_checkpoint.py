import random

import numpy as np
import torch
from torch import nn

from mmfactory.config import ScheduleConfig
from mmfactory.train import checkpoint as ckpt
from mmfactory.train.optim import build_scheduler


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # frozen: not in the checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = build_scheduler(opt, 20, ScheduleConfig(warmup_steps=2))
    return model, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_round_trip_restores_everything_and_continues_identically(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    path = ckpt.save_checkpoint(
        tmp_path, 3, named, opt.state_dict(), sched, [ckpt.rng_state()], extra={"note": 1}
    )
    random.random(), np.random.rand()  # noqa: B018 - advance every RNG
    _train(model, opt, sched, 4)
    expected = [p.detach().clone() for p in model.parameters()]
    py_next, np_next = random.random(), np.random.rand()

    model2, opt2, sched2 = _setup()
    state = ckpt.load_checkpoint(path, model2, opt2, sched2, rank=0)
    assert state["step"] == 3 and state["note"] == 1
    random.random(), np.random.rand()  # noqa: B018
    _train(model2, opt2, sched2, 4)
    for a, b in zip(expected, model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (random.random(), np.random.rand()) == (py_next, np_next)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_partial_writes_are_ignored_and_cleaned(tmp_path):
    model, opt, sched = _setup()
    named = dict(model.named_parameters())
    ckpt.save_checkpoint(tmp_path, 2, named, opt.state_dict(), sched, [ckpt.rng_state()])
    half = ckpt.atomic_dir(tmp_path / "step-4")  # a crash while writing step 4
    (half / "trainable.safetensors").write_bytes(b"partial")
    (tmp_path / "step-6").mkdir()  # a folder without state.json is not a checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    mine = tmp_path / "notes.tmp-keep"  # not a name the runner makes: left alone
    mine.mkdir()
    ckpt.remove_partial(tmp_path)
    assert not half.exists() and mine.is_dir()


def test_optimizer_flattening_round_trips():
    model, opt, sched = _setup()
    _train(model, opt, sched, 2)
    tensors, meta = ckpt.optimizer_to_flat(opt.state_dict())
    rebuilt = ckpt.optimizer_from_flat(tensors, meta)
    original = opt.state_dict()
    assert rebuilt["param_groups"] == original["param_groups"]
    for index, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(rebuilt["state"][index][key], value)


def test_persistent_buffers_round_trip_and_non_persistent_ones_are_left_out(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    model.register_buffer("scratch", torch.zeros(3), persistent=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, 10, ScheduleConfig())
    model(torch.randn(16, 4))  # running statistics move without a gradient
    buffers = ckpt.persistent_buffers(model)
    assert set(buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    path = ckpt.save_checkpoint(
        tmp_path,
        1,
        dict(model.named_parameters()),
        opt.state_dict(),
        sched,
        [ckpt.rng_state()],
        buffers=buffers,
    )
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    ckpt.load_checkpoint(path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), sched, rank=0)
    assert torch.equal(fresh[1].running_mean, model[1].running_mean)
    assert int(fresh[1].num_batches_tracked) == 1
