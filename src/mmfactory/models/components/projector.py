"""Vision-to-language projectors, named as LLaVA's builder names them.

``linear`` is LLaVA-1's single linear map; ``mlp{N}x_gelu`` is ``N`` linear layers with GELU between them
(``mlp2x_gelu`` is LLaVA-1.5's, and the layout transformers' ``LlavaMultiModalProjector`` holds as
``linear_1``/``linear_2``). Both are ``nn.Sequential``, so the first linear layer is always ``[0]`` and
the ``k``-th is ``[2k]``: HyperLLaVA's visual expert hooks in between them.
"""

from __future__ import annotations

import re

from torch import nn

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str) -> int:
    """Number of linear layers of ``linear`` (1) or ``mlp{N}x_gelu`` (N); ValueError for other names."""
    if projector_type == "linear":
        return 1
    match = _MLP_GELU.match(projector_type)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown projector_type {projector_type!r}; expected 'linear' or 'mlp<N>x_gelu'")
    return int(match.group(1))


def build_projector(projector_type: str, vision_hidden_size: int, text_hidden_size: int) -> nn.Sequential:
    """Maps vision features ``[..., vision_hidden_size]`` to LM embeddings ``[..., text_hidden_size]``."""
    layers: list[nn.Module] = [nn.Linear(vision_hidden_size, text_hidden_size)]
    for _ in range(projector_depth(projector_type) - 1):
        layers += [nn.GELU(), nn.Linear(text_hidden_size, text_hidden_size)]
    return nn.Sequential(*layers)
