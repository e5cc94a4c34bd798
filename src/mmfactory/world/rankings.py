"""Captions of graded quality with tied rankings, a noisy web pool, and image preference pairs."""

from dataclasses import replace

import numpy as np

from mmfactory.world.captions import caption, plural
from mmfactory.world.scenes import COLORS, HELD_OUT, POSITIONS, SHAPES, SIZES, Scene, sample_scene
from mmfactory.world.vqa import DESCRIBE, scene_question, wrong_answer

# Quality of each caption kind (higher is better); equal quality -> tied rank. Following Filter & Align's
# "D > A > C = B": a brief caption and a detailed one that misses an object are equally good.
QUALITY = {"detailed": 4, "brief": 3, "incomplete": 3, "wrong_attribute": 2, "web_noise": 1, "unrelated": 1}
ALIGNED_KINDS = ("detailed", "brief")
BAD_KINDS = ("wrong_attribute", "unrelated", "web_noise")
WEB_NOISE = (
    "IMG_{number}.png",
    "{shape} icon png free download",
    "stock vector illustration {number}",
    "abstract background pattern hd wallpaper",
    "cute {shapes} clipart, click to see more",
)


def _cell_center(cell: int) -> tuple[float, float]:
    return ((cell % 3) + 0.5) / 3, ((cell // 3) + 0.5) / 3


def _free_cells(scene: Scene) -> list[int]:
    cells = [r * 3 + c for r, row in enumerate(POSITIONS) for c, p in enumerate(row)]
    taken = {o.position for o in scene.objects}
    return [cell for cell in cells if POSITIONS[cell // 3][cell % 3] not in taken]


def wrong_attribute_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with one attribute (colour, shape, size or position) of one object changed.

    An invented object is never a held-out combination (those appear only in test_compositional).
    """
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    others = scene.names() - {obj.name}
    attribute = ("color", "shape", "size", "position")[rng.integers(4)]
    if attribute == "color":
        options = [c for c in COLORS if c != obj.color and f"{c} {obj.shape}" not in others]
        options = [c for c in options if (obj.shape, c) not in HELD_OUT]
        change = {"color": options[rng.integers(len(options))]}
    elif attribute == "shape":
        options = [s for s in SHAPES if s != obj.shape and f"{obj.color} {s}" not in others]
        options = [s for s in options if (s, obj.color) not in HELD_OUT]
        change = {"shape": options[rng.integers(len(options))]}
    elif attribute == "size":
        change = {"size": SIZES[1 - SIZES.index(obj.size)]}
    else:
        free = _free_cells(scene)
        x, y = _cell_center(free[rng.integers(len(free))])
        change = {"x": x, "y": y}
    objects = list(scene.objects)
    objects[k] = replace(obj, **change)
    return Scene(tuple(objects), scene.background).in_reading_order()


def extra_object_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` plus one hallucinated object (absent colour+shape) in a free cell."""
    free = _free_cells(scene)
    while True:
        extra = sample_scene(rng, max_objects=1).objects[0]
        if extra.name not in scene.names():
            break
    x, y = _cell_center(free[rng.integers(len(free))])
    return Scene((*scene.objects, replace(extra, x=x, y=y)), scene.background).in_reading_order()


def unrelated_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """Another scene sharing no colour+shape object with ``scene``."""
    while True:
        other = sample_scene(rng)
        if not other.names() & scene.names():
            return other


def graded_caption(scene: Scene, kind: str, rng: np.random.Generator, lang: str = "en") -> str:
    """A caption of ``scene`` of the given quality ``kind`` (a key of QUALITY)."""
    if kind in ("detailed", "brief"):
        return caption(scene, lang, kind)
    if kind == "incomplete":
        drop = int(rng.integers(len(scene.objects)))
        return caption(Scene(scene.objects[:drop] + scene.objects[drop + 1 :], scene.background), lang)
    if kind == "wrong_attribute":
        return caption(wrong_attribute_scene(scene, rng), lang)
    if kind == "unrelated":
        return caption(unrelated_scene(scene, rng), lang)
    if kind == "web_noise":
        shape = scene.objects[rng.integers(len(scene.objects))].shape
        template = WEB_NOISE[rng.integers(len(WEB_NOISE))]
        return template.format(number=int(rng.integers(1000, 10000)), shape=shape, shapes=plural(shape))
    raise ValueError(f"unknown caption kind {kind!r}; expected one of {tuple(QUALITY)}")


def dense_ranks(kinds: list[str]) -> list[int]:
    """Rank 1 = best quality; equal quality shares a rank; ranks are consecutive (1, 2, 2, 3, ...)."""
    levels = sorted({QUALITY[k] for k in kinds}, reverse=True)
    return [levels.index(QUALITY[k]) + 1 for k in kinds]


def ranked_captions(scene: Scene, rng: np.random.Generator, lang: str = "en") -> dict:
    """Every caption kind (``incomplete`` only with 2+ objects) in random order:
    ``{"captions": [str], "ranks": [int], "kinds": [str]}``."""
    kinds = [k for k in QUALITY if k != "incomplete" or len(scene.objects) > 1]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    captions = [graded_caption(scene, k, rng, lang) for k in kinds]
    return {"captions": captions, "ranks": dense_ranks(kinds), "kinds": kinds}


def pool_kinds(n: int, bad_fraction: float, rng: np.random.Generator) -> list[str]:
    """Kinds of ``n`` web-pool pairs: exactly ``round(n * bad_fraction)`` bad ones at random positions."""
    if not 0.0 <= bad_fraction <= 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1], got {bad_fraction}")
    bad = np.zeros(n, dtype=bool)
    bad[rng.permutation(n)[: round(n * bad_fraction)]] = True
    return [
        BAD_KINDS[rng.integers(len(BAD_KINDS))] if is_bad else ALIGNED_KINDS[rng.integers(len(ALIGNED_KINDS))]
        for is_bad in bad
    ]


def image_preference(scene: Scene, rng: np.random.Generator) -> dict:
    """``{"prompt", "chosen", "rejected"}`` for an image: a faithful vs a hallucinated description
    (wrong attribute or extra object), or a correct vs a wrong short answer."""
    if rng.random() < 0.5:
        hallucinated = wrong_attribute_scene if rng.random() < 0.5 else extra_object_scene
        prompt, chosen, rejected = (
            DESCRIBE["en"]["detailed"],
            caption(scene),
            caption(hallucinated(scene, rng)),
        )
    else:
        qa = scene_question(scene, rng)
        prompt, chosen, rejected = qa["question"], qa["answer"], wrong_answer(qa, rng)
    return {"prompt": "<image>\n" + prompt, "chosen": chosen, "rejected": rejected}
