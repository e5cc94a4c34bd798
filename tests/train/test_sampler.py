import itertools

import pytest

from mmfactory.train.sampler import StepSampler


def _step_sets(batch_size, grad_accum, world, steps, num_samples=50, lengths=None):
    """The set of indices each optimizer step sees, over all processes and micro-batches."""
    streams = [
        StepSampler(num_samples, batch_size, grad_accum, world, rank, seed=3, lengths=lengths).micro_batches()
        for rank in range(world)
    ]
    out = []
    for _ in range(steps):
        seen = []
        for stream in streams:
            for micro in itertools.islice(stream, grad_accum):
                assert len(micro) == batch_size
                seen += micro
        out.append(sorted(seen))
    return out


def test_steps_see_the_same_samples_however_they_are_split():
    reference = _step_sets(8, 1, 1, steps=9)  # crosses an epoch boundary (6 steps per epoch)
    assert _step_sets(1, 8, 1, steps=9) == reference
    assert _step_sets(4, 1, 2, steps=9) == reference
    assert _step_sets(2, 2, 2, steps=9) == reference
    epoch0 = [i for step in reference[:6] for i in step]
    assert len(set(epoch0)) == 48  # no repeats inside an epoch; the 2 leftover samples are dropped


def test_resume_position_is_the_global_step():
    sampler = StepSampler(50, 4, 2, 1, 0, seed=1)
    full = list(itertools.islice(sampler.micro_batches(), 40))
    resumed = list(itertools.islice(sampler.micro_batches(start_step=7), 26))
    assert resumed == full[14:]


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than one global batch of 16"):
        StepSampler(10, 4, 2, 2, 0)


def test_length_grouping_sorts_each_step_by_modality_then_length_and_keeps_its_samples():
    lengths = [(-1) ** i * (5 + (7 * i) % 23) for i in range(50)]  # odd indices: text-only (negative)
    reference = _step_sets(8, 1, 1, steps=9)
    for split in ((8, 1, 1), (1, 8, 1), (2, 2, 2)):
        assert _step_sets(*split, steps=9, lengths=lengths) == reference
    sampler = StepSampler(50, 2, 4, 1, 0, seed=3, lengths=lengths)
    step = [i for micro in itertools.islice(sampler.micro_batches(), 4) for i in micro]
    keys = [(lengths[i] < 0, -abs(lengths[i])) for i in step]
    assert keys == sorted(keys)  # multimodal first, each longest first
    lengths = lengths + lengths[:14]  # 64 samples: 2 steps of 8 micro-batches of 4
    padding = {  # pad tokens when every micro-batch is padded to its longest sample
        name: sum(
            4 * max(abs(lengths[i]) for i in micro) - sum(abs(lengths[i]) for i in micro)
            for micro in itertools.islice(StepSampler(64, 4, 8, 1, 0, seed=3, lengths=by).micro_batches(), 16)
        )
        for name, by in (("grouped", lengths), ("plain", None))
    }
    assert padding["grouped"] < padding["plain"] / 3  # 125 vs 457 pad tokens
