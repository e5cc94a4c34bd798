"""The consistency judge: a small CNN that reads a scene image as a grid of cells, each empty or holding one
object of some shape and colour, plus the background. Trained on real world images, it scores generated
images against the layout their prompt asked for (colour / shape / position / count accuracy), and its
pooled features are the embedding of the Fréchet distance (the Inception network's role in FID).

A layout is ``cells`` ``[B, G*G, 2]`` (per cell: shape index + 1 and colour index + 1, 0 = empty) and
``background`` ``[B]``; the world adapter (:func:`mmfactory.data.world_source.world_scene_layout`) makes them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel


class SceneJudgeConfig(PretrainedConfig):
    model_type = "mmfactory_scene_judge"

    def __init__(
        self,
        image_size: int = 32,
        grid: int = 3,
        num_shapes: int = 8,
        num_colors: int = 8,
        num_backgrounds: int = 3,
        hidden_sizes: list[int] | tuple[int, ...] = (32, 64, 128),
        **kwargs,
    ):
        self.image_size, self.grid = image_size, grid
        self.num_shapes, self.num_colors, self.num_backgrounds = num_shapes, num_colors, num_backgrounds
        self.hidden_sizes = list(hidden_sizes)
        super().__init__(**kwargs)


class SceneJudge(PreTrainedModel):
    config_class = SceneJudgeConfig
    main_input_name = "pixel_values"

    def __init__(self, config: SceneJudgeConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        channels = 3
        for size in config.hidden_sizes:
            layers += [nn.Conv2d(channels, size, 3, padding=1), nn.BatchNorm2d(size), nn.ReLU()]
            layers += [nn.Conv2d(size, size, 3, padding=1), nn.BatchNorm2d(size), nn.ReLU(), nn.MaxPool2d(2)]
            channels = size
        self.features = nn.Sequential(*layers)
        self.cells = nn.AdaptiveAvgPool2d(config.grid)
        self.shape_head = nn.Conv2d(channels, config.num_shapes + 1, 1)
        self.color_head = nn.Conv2d(channels, config.num_colors + 1, 1)
        self.background_head = nn.Linear(channels, config.num_backgrounds)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # PyTorch's default initialisation of every layer, as built

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        """Pixels ``[B, 3, S, S]`` in [-1, 1] -> ``shape`` ``[B, G*G, num_shapes+1]``, ``color``
        ``[B, G*G, num_colors+1]``, ``background`` ``[B, num_backgrounds]`` logits and pooled ``features``
        ``[B, F]``."""
        if pixel_values.shape[-1] != self.config.image_size:
            size = self.config.image_size
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bilinear", antialias=True)
        maps = self.features(pixel_values)
        cells = self.cells(maps)
        pooled = maps.mean((2, 3))
        return {
            "shape": self.shape_head(cells).flatten(2).transpose(1, 2),
            "color": self.color_head(cells).flatten(2).transpose(1, 2),
            "background": self.background_head(pooled),
            "features": pooled,
        }


def judge_loss(out: dict[str, Tensor], cells: Tensor, background: Tensor) -> Tensor:
    """Mean of the per-cell shape and colour cross-entropies and the background cross-entropy."""
    shape = F.cross_entropy(out["shape"].flatten(0, 1), cells[..., 0].flatten())
    color = F.cross_entropy(out["color"].flatten(0, 1), cells[..., 1].flatten())
    return (shape + color + F.cross_entropy(out["background"], background)) / 3


def consistency(out: dict[str, Tensor], cells: Tensor) -> dict[str, Tensor]:
    """Per image, how well the judged layout matches the asked one ``cells`` ``[B, G*G, 2]``.

    Over the asked objects: ``position`` (its cell is not empty), ``shape`` and ``color`` (right at its
    cell), ``object`` (all three); ``count`` (as many non-empty cells as asked objects); ``scene`` (every
    object right and nothing else: the whole prompt). Each ``[B]`` float in [0, 1].
    """
    shape, color = out["shape"].argmax(-1), out["color"].argmax(-1)
    asked = cells[..., 0] > 0
    n = asked.sum(1).clamp(min=1)
    present = shape > 0
    right_shape = asked & (shape == cells[..., 0])
    right_color = asked & (color == cells[..., 1])
    objects = right_shape & right_color
    count = (present.sum(1) == asked.sum(1)).float()
    return {
        "position": (asked & present).sum(1) / n,
        "shape": right_shape.sum(1) / n,
        "color": right_color.sum(1) / n,
        "object": objects.sum(1) / n,
        "count": count,
        "scene": ((objects.sum(1) == asked.sum(1)) & (count > 0)).float(),
    }


AutoConfig.register(SceneJudgeConfig.model_type, SceneJudgeConfig, exist_ok=True)
AutoModel.register(SceneJudgeConfig, SceneJudge, exist_ok=True)
