import itertools

import pytest

from mmfactory.train.sampler import StepSampler


def _step_sets(batch_size, grad_accum, world, steps, num_samples=50):
    """The set of indices each optimizer step sees, over all processes and micro-batches."""
    streams = [
        StepSampler(num_samples, batch_size, grad_accum, world, rank, seed=3).micro_batches()
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
