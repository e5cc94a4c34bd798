"""Zero-shot classification with an image-text model: each class is the mean of its prompts' normalised
text embeddings (CLIP's prompt ensembling); an image takes the class of highest cosine similarity."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmfactory.data.benchmarks import ZeroShotBenchmark


def zero_shot_accuracy(
    benchmark: ZeroShotBenchmark,
    encode_images: Callable[[Sequence[np.ndarray]], Tensor],
    encode_texts: Callable[[Sequence[str]], Tensor],
) -> dict[str, float]:
    """``{name}_acc`` and ``{name}_balanced_acc`` (mean per-class recall over the classes present; chance
    is 1 / classes), in percent. The encoders return ``[N, P]`` L2-normalised embeddings."""
    image_embeds = encode_images(benchmark.images)
    class_embeds = torch.stack([F.normalize(encode_texts(p).mean(dim=0), dim=-1) for p in benchmark.prompts])
    predicted = (image_embeds @ class_embeds.T).argmax(dim=-1).cpu().numpy()
    truth = np.asarray(benchmark.labels)
    recalls = [np.mean(predicted[truth == k] == k) for k in np.unique(truth)]
    return {
        f"{benchmark.name}_acc": 100.0 * float(np.mean(predicted == truth)),
        f"{benchmark.name}_balanced_acc": 100.0 * float(np.mean(recalls)),
    }
