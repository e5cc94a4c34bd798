"""The style scorer of SAG's self-improvement filter and NoteBench: ``P(styled | text)``.

The paper leaves the style filter's model open; this one is a logistic regression on character
n-grams, which sees emoji, punctuation, line breaks and wording alike and works for English and Chinese
without a tokenizer. Features: ``log(1 + count)`` of the ``max_features`` n-grams (``ngram_min`` ..
``ngram_max`` characters) found in most training texts, each text's vector L2-normalised. Weights
minimise mean binary cross-entropy ``+ l2 / 2 * ||w||^2`` (bias not penalised), full-batch L-BFGS in
float64, so a fit is deterministic.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class StyleScorerConfig:
    ngram_min: int = 1
    ngram_max: int = 3
    max_features: int = 2048
    l2: float = 1e-3
    max_iter: int = 200  # L-BFGS iterations


def char_ngrams(text: str, ngram_min: int, ngram_max: int) -> Counter[str]:
    """Counts of the character n-grams of ``text`` for ``n`` in ``[ngram_min, ngram_max]``."""
    return Counter(text[i : i + n] for n in range(ngram_min, ngram_max + 1) for i in range(len(text) - n + 1))


def logistic_objective(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, l2: float
) -> torch.Tensor:
    """Mean binary cross-entropy of ``features @ weight + bias`` plus ``l2 / 2 * ||weight||^2``.

    Args:
        weight: ``[F]``; bias: ``[]``; features: ``[N, F]``; labels: ``[N]`` in {0, 1}.
    """
    logits = features @ weight + bias
    return F.binary_cross_entropy_with_logits(logits, labels) + 0.5 * l2 * weight.square().sum()


class StyleScorer:
    """A fitted scorer: ``score(texts)`` gives ``[N]`` probabilities that each text is in the style."""

    def __init__(self, vocabulary: list[str], weight: np.ndarray, bias: float, cfg: StyleScorerConfig):
        self.vocabulary, self.weight, self.bias, self.cfg = vocabulary, weight, bias, cfg
        self._index = {gram: i for i, gram in enumerate(vocabulary)}

    def features(self, texts: list[str]) -> np.ndarray:
        """``[N, F]`` float64 feature matrix."""
        out = np.zeros((len(texts), len(self.vocabulary)))
        for row, text in enumerate(texts):
            for gram, count in char_ngrams(text, self.cfg.ngram_min, self.cfg.ngram_max).items():
                column = self._index.get(gram)
                if column is not None:
                    out[row, column] = np.log1p(count)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def score(self, texts: list[str]) -> np.ndarray:
        """``[N]`` probabilities in (0, 1)."""
        if not texts:
            return np.zeros(0)
        return 1.0 / (1.0 + np.exp(-(self.features(texts) @ self.weight + self.bias)))

    @classmethod
    def fit(cls, styled: list[str], neutral: list[str], cfg: StyleScorerConfig) -> StyleScorer:
        """Fit on texts in the target style (label 1) and neutral texts (label 0)."""
        if not styled or not neutral:
            raise ValueError("the style scorer needs both styled and neutral training texts")
        texts = styled + neutral
        document_frequency: Counter[str] = Counter()
        for text in texts:
            document_frequency.update(char_ngrams(text, cfg.ngram_min, cfg.ngram_max).keys())
        ranked = sorted(document_frequency.items(), key=lambda item: (-item[1], item[0]))
        scorer = cls([gram for gram, _ in ranked[: cfg.max_features]], np.zeros(0), 0.0, cfg)

        features = torch.from_numpy(scorer.features(texts))
        labels = torch.tensor([1.0] * len(styled) + [0.0] * len(neutral), dtype=torch.float64)
        weight = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], max_iter=cfg.max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = logistic_objective(weight, bias, features, labels, cfg.l2)
            loss.backward()
            return loss

        optimizer.step(closure)
        scorer.weight, scorer.bias = weight.detach().numpy(), bias.item()
        return scorer

    def save(self, path: Path) -> None:
        state = {"config": asdict(self.cfg), "vocabulary": self.vocabulary, "bias": self.bias}
        state["weight"] = self.weight.tolist()
        Path(path).write_text(json.dumps(state, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> StyleScorer:
        state = json.loads(Path(path).read_text())
        cfg = StyleScorerConfig(**state["config"])
        return cls(state["vocabulary"], np.asarray(state["weight"], dtype=np.float64), state["bias"], cfg)
