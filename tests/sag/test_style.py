"""The style scorer: its objective against a naive one (forward and gradient), the fit's optimality,
and that it scores style markers rather than wording."""

import numpy as np
import torch

from mmfactory.data.world_source import world_articles
from mmfactory.sag.style import StyleScorer, StyleScorerConfig, char_ngrams, logistic_objective


def _naive_objective(weight, bias, features, labels, l2):
    total = 0.0
    for row, label in zip(features, labels, strict=True):
        z = sum(w * x for w, x in zip(weight, row, strict=True)) + bias
        p = 1 / (1 + torch.exp(-z))
        total = total - (label * torch.log(p) + (1 - label) * torch.log(1 - p))
    return total / len(labels) + 0.5 * l2 * sum(w * w for w in weight)


def test_objective_matches_naive_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(5, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    weight = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    got = logistic_objective(weight, bias, features, labels, l2=0.1)
    want = _naive_objective(weight, bias, features, labels, 0.1)
    torch.testing.assert_close(got, want)
    for g, w in zip(
        torch.autograd.grad(got, [weight, bias]), torch.autograd.grad(want, [weight, bias]), strict=True
    ):
        torch.testing.assert_close(g, w)


def test_char_ngrams():
    assert char_ngrams("aba", 1, 2) == {"a": 2, "b": 1, "ab": 1, "ba": 1}


def test_fit_is_optimal_scores_style_and_round_trips(tmp_path):
    train = world_articles("train", 60, 0, ["en", "zh"]).items
    styled = [a["reference"] for a in train]
    neutral = [a["draft"] for a in train] + [a["variants"]["off_style"] for a in train]
    cfg = StyleScorerConfig(max_features=512)
    scorer = StyleScorer.fit(styled, neutral, cfg)

    # L-BFGS reached the minimum: the gradient of the objective vanishes there.
    features = torch.from_numpy(scorer.features(styled + neutral))
    labels = torch.tensor([1.0] * len(styled) + [0.0] * len(neutral), dtype=torch.float64)
    weight = torch.from_numpy(scorer.weight).requires_grad_()
    bias = torch.tensor(scorer.bias, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(logistic_objective(weight, bias, features, labels, cfg.l2), [weight, bias])
    assert max(g.abs().max().item() for g in grads) < 1e-4  # (about 0.1 at the start)

    test = world_articles("test", 30, 0, ["en", "zh"]).items
    styled_scores = scorer.score([a["reference"] for a in test])
    # Same words, style markers (emoji, line breaks, hashtags) removed: scored as neutral.
    off_style_scores = scorer.score([a["variants"]["off_style"] for a in test])
    assert styled_scores.min() > 0.5 > off_style_scores.max()
    assert scorer.score([]).shape == (0,)

    scorer.save(tmp_path / "s.json")
    np.testing.assert_array_equal(StyleScorer.load(tmp_path / "s.json").score(styled), scorer.score(styled))
