"""Caption grammar for scenes, in English and Chinese, brief and detailed; object mentions in text."""

import re

from mmfactory.world.scenes import COLORS, SHAPES, Scene, SceneObject

LANGS = ("en", "zh")
SHAPE_ZH = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "星形",
    "cross": "十字形",
    "diamond": "菱形",
    "ring": "圆环",
    "hexagon": "六边形",
}
SHAPE_PLURAL = {"cross": "crosses"}
COLOR_ZH = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
    "cyan": "青色",
    "pink": "粉色",
    "black": "黑色",
    "gray": "灰色",
    "white": "白色",
}
SIZE_ZH = {"small": "小", "large": "大"}
POSITION_ZH = {
    "top left": "左上方",
    "top": "上方",
    "top right": "右上方",
    "left": "左侧",
    "center": "中间",
    "right": "右侧",
    "bottom left": "左下方",
    "bottom": "下方",
    "bottom right": "右下方",
}


_MENTION = re.compile(rf"\b({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})(?:e?s)?\b", flags=re.IGNORECASE)


def object_mentions(text: str) -> list[str]:
    """Object names (``"red star"``) an English text mentions, in order, repeats kept: a colour word directly
    followed by a shape word (singular or plural), as every English caption and answer of the world says
    them. Background colours (black, gray, white) are not object colours and never match."""
    return [f"{color.lower()} {shape.lower()}" for color, shape in _MENTION.findall(text)]


def plural(shape: str) -> str:
    return SHAPE_PLURAL.get(shape, shape + "s")


def with_article(phrase: str) -> str:
    """``"orange star"`` -> ``"an orange star"``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_en(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def join_zh(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def at_position(position: str) -> str:
    """English locative: "at the top left", "on the left", "in the center"."""
    if position == "center":
        return "in the center"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def object_phrase(obj: SceneObject, lang: str, size: bool = False) -> str:
    """``"a large red star"`` / ``"一个大的红色星形"`` (size optional)."""
    if lang == "en":
        return with_article(f"{obj.size} {obj.name}" if size else obj.name)
    return f"一个{SIZE_ZH[obj.size] + '的' if size else ''}{COLOR_ZH[obj.color]}{SHAPE_ZH[obj.shape]}"


def brief_caption(scene: Scene, lang: str = "en") -> str:
    """Objects by colour and shape only: "A red star and a blue circle." / "一个红色星形和一个蓝色圆形。"."""
    phrases = [object_phrase(o, lang) for o in scene.objects]
    return capitalize(join_en(phrases)) + "." if lang == "en" else join_zh(phrases) + "。"


def detailed_caption(scene: Scene, lang: str = "en") -> str:
    """Every attribute: size, colour, shape, position of each object and the background."""
    if lang == "en":
        parts = [f"{object_phrase(o, 'en', size=True)} {at_position(o.position)}" for o in scene.objects]
        return capitalize(join_en(parts)) + f", on a {scene.background} background."
    parts = [f"{POSITION_ZH[o.position]}有{object_phrase(o, 'zh', size=True)}" for o in scene.objects]
    return f"{COLOR_ZH[scene.background]}背景上，" + "，".join(parts) + "。"


def caption(scene: Scene, lang: str = "en", detail: str = "detailed") -> str:
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected one of {LANGS}")
    if detail not in ("brief", "detailed"):
        raise ValueError(f"unknown detail {detail!r}; expected 'brief' or 'detailed'")
    return detailed_caption(scene, lang) if detail == "detailed" else brief_caption(scene, lang)
