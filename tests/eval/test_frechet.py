"""The Fréchet distance against closed forms and an independent eigenvalue route."""

import numpy as np
import pytest

from mmfactory.eval.metrics import frechet_distance


def test_identical_sets_are_at_zero_and_a_shift_costs_its_squared_norm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0, 0.0])) == pytest.approx(5.0, abs=1e-8)


def test_equals_the_trace_of_the_square_root_of_the_covariance_product():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^1/2) = sum of the square roots of the (real, non-negative) eigenvalues of S_a S_b
    cross = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
