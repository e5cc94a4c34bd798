"""Scenes of coloured shapes: sampling (with a compositional hold-out), rendering to ``uint8 [H, W, 3]``."""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mmfactory.world.rng import IMAGE_SPLITS, check_split, item_rng

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (245, 130, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
}
SIZES = ("small", "large")
# Object radius as a fraction of the image side; a large object just fills one cell of the 3x3 grid.
RADIUS = {"small": 0.09, "large": 0.155}
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# Skewed priors make some objects "popular" (POPE's popular negatives) instead of all equally frequent.
SHAPE_PRIOR = np.array([1.0 / (k + 1) ** 0.6 for k in range(len(SHAPES))])
SHAPE_PRIOR /= SHAPE_PRIOR.sum()
COLOR_PRIOR = np.array([1.0 / (k + 1) ** 0.6 for k in range(len(COLORS))])
COLOR_PRIOR /= COLOR_PRIOR.sum()
# The compositional split: one colour per shape (8 of 64 combinations) never appears in train/val/test.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (shape, list(COLORS)[(3 * k + 1) % len(COLORS)]) for k, shape in enumerate(SHAPES)
)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``x``, ``y`` are its centre as fractions of the image side (0 = left/top)."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    @property
    def position(self) -> str:
        """The 3x3 grid cell holding the centre, e.g. ``"top left"``."""
        return POSITIONS[min(int(self.y * 3), 2)][min(int(self.x * 3), 2)]

    @property
    def name(self) -> str:
        """``"red star"``: colour + shape, the identity of an object within a scene."""
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str

    def names(self) -> set[str]:
        return {o.name for o in self.objects}

    def in_reading_order(self) -> "Scene":
        """Objects sorted top row first, then left to right (the order captions list them in)."""
        return Scene(tuple(sorted(self.objects, key=lambda o: (min(int(o.y * 3), 2), o.x))), self.background)


def object_frequency() -> dict[str, float]:
    """Prior probability of each allowed ``"color shape"`` name in train/val/test scenes (sums to 1)."""
    freq = {
        f"{c} {s}": SHAPE_PRIOR[i] * COLOR_PRIOR[j]
        for i, s in enumerate(SHAPES)
        for j, c in enumerate(COLORS)
        if (s, c) not in HELD_OUT
    }
    total = sum(freq.values())
    return {k: v / total for k, v in freq.items()}


def sample_object_kind(rng: np.random.Generator, held_out: bool = False) -> tuple[str, str]:
    """A (shape, colour) pair from the priors, excluding HELD_OUT (or drawn only from it)."""
    if held_out:
        return sorted(HELD_OUT)[rng.integers(len(HELD_OUT))]
    while True:
        kind = (
            SHAPES[rng.choice(len(SHAPES), p=SHAPE_PRIOR)],
            list(COLORS)[rng.choice(len(COLORS), p=COLOR_PRIOR)],
        )
        if kind not in HELD_OUT:
            return kind


def sample_scene(rng: np.random.Generator, compositional: bool = False, max_objects: int = 4) -> Scene:
    """1..max_objects objects with distinct (shape, colour), one per 3x3 grid cell, in reading order.

    With ``compositional`` the first object drawn is a held-out combination; otherwise none is.
    """
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(9)[:n]
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        kind = sample_object_kind(rng, held_out=compositional and not kinds)
        if kind not in kinds:
            kinds.append(kind)
    objects = []
    for (shape, color), cell in zip(kinds, cells, strict=True):
        size = SIZES[rng.integers(2)]
        slack = 1 / 6 - RADIUS[size]  # keep the whole object inside its cell
        x, y = ((cell % 3) + 0.5) / 3, ((cell // 3) + 0.5) / 3
        dx, dy = rng.uniform(-slack, slack, size=2)
        objects.append(SceneObject(shape, color, size, float(x + dx), float(y + dy)))
    return Scene(tuple(objects), list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]).in_reading_order()


def scene_at(seed: int, split: str, index: int, max_objects: int = 4) -> Scene:
    """Scene ``index`` of an image split (or of the web ``"pool"``); shared by every image task."""
    check_split(split, (*IMAGE_SPLITS, "pool"))
    rng = item_rng(seed, "scene", split, index)
    return sample_scene(rng, compositional=split == "test_compositional", max_objects=max_objects)


def _regular_polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]


def draw_object(
    draw: ImageDraw.ImageDraw, shape: str, rgb: tuple[int, int, int], cx: float, cy: float, r: float
):
    """Draw one shape of circumradius ``r`` (pixels) centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=rgb, width=max(1, round(0.4 * r)))
    elif shape == "square":
        h = 0.8 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=rgb)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, 1.1 * r, 3, -np.pi / 2), fill=rgb)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)], fill=rgb)
    elif shape == "star":
        outer = _regular_polygon(cx, cy, r, 5, -np.pi / 2)
        inner = _regular_polygon(cx, cy, 0.45 * r, 5, -np.pi / 2 + np.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=rgb)
    elif shape == "cross":
        w = 0.34 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=rgb)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(objects: tuple[SceneObject, ...] | list[SceneObject], background: str, size: int) -> np.ndarray:
    """Render objects on a background: ``uint8 [size, size, 3]``, antialiased by 4x supersampling."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for o in objects:
        draw_object(draw, o.shape, COLORS[o.color], o.x * big, o.y * big, RADIUS[o.size] * big)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def render_scene(scene: Scene, size: int = 32) -> np.ndarray:
    """``uint8 [size, size, 3]`` RGB image of ``scene``."""
    return render(scene.objects, scene.background, size)
