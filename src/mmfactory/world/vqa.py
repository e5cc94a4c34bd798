"""Scene questions with short canonical answers, POPE-style yes/no probes and LLaVA-style conversations."""

from dataclasses import replace

import numpy as np

from mmfactory.world.captions import (
    COLOR_ZH,
    POSITION_ZH,
    SHAPE_ZH,
    at_position,
    caption,
    plural,
    with_article,
)
from mmfactory.world.scenes import COLORS, HELD_OUT, POSITIONS, SHAPES, Scene, SceneObject, object_frequency

QUESTION_TYPES = ("color", "shape", "count", "position", "existence")
POPE_KINDS = ("random", "popular", "adversarial")
YES_NO = {"en": ("yes", "no"), "zh": ("有", "没有")}
POPULAR_TOP_K = 6  # popular negatives come from the K most frequent absent objects


def _unique(scene: Scene, obj: SceneObject, attribute: str) -> bool:
    return sum(getattr(o, attribute) == getattr(obj, attribute) for o in scene.objects) == 1


def referring_expression(scene: Scene, obj: SceneObject, lang: str) -> str:
    """Shortest unambiguous name: "the star", "the red object" or "the red star" (and Chinese)."""
    if _unique(scene, obj, "shape"):
        return f"the {obj.shape}" if lang == "en" else SHAPE_ZH[obj.shape]
    if _unique(scene, obj, "color"):
        return f"the {obj.color} object" if lang == "en" else f"{COLOR_ZH[obj.color]}的物体"
    return f"the {obj.name}" if lang == "en" else COLOR_ZH[obj.color] + SHAPE_ZH[obj.shape]


def near_misses(scene: Scene) -> list[str]:
    """Absent ``"color shape"`` names one attribute away from a present object (sorted).

    Like every invented object, never a held-out combination, so those appear only in test_compositional.
    """
    candidates = {(o.shape, c) for o in scene.objects for c in COLORS}
    candidates |= {(s, o.color) for o in scene.objects for s in SHAPES}
    return sorted(f"{c} {s}" for s, c in candidates - HELD_OUT if f"{c} {s}" not in scene.names())


def _name_zh(name: str) -> str:
    color, shape = name.split(" ")
    return COLOR_ZH[color] + SHAPE_ZH[shape]


def existence_question(name: str, lang: str) -> str:
    return f"Is there {with_article(name)} in the image?" if lang == "en" else f"图中有{_name_zh(name)}吗？"


QUESTIONS = {
    "en": {
        "color_of_shape": "What color is the {shape}?",
        "color_at": "What color is the object {at}?",
        "shape_of_color": "What shape is the {color} object?",
        "shape_at": "What shape is the object {at}?",
        "count_all": "How many objects are there?",
        "count_shape": "How many {shapes} are there?",
        "position": "Where is {ref}?",
    },
    "zh": {
        "color_of_shape": "{shape}是什么颜色？",
        "color_at": "{at}的物体是什么颜色？",
        "shape_of_color": "{color}的物体是什么形状？",
        "shape_at": "{at}的物体是什么形状？",
        "count_all": "图中一共有几个物体？",
        "count_shape": "图中有几个{shape}？",
        "position": "{ref}在哪里？",
    },
}


def _words(obj: SceneObject, lang: str) -> dict[str, str]:
    """The object's attributes as words of ``lang``: shape, shapes, color, at (locative), position."""
    if lang == "en":
        return {
            "shape": obj.shape,
            "shapes": plural(obj.shape),
            "color": obj.color,
            "at": at_position(obj.position),
            "position": obj.position,
        }
    position = POSITION_ZH[obj.position]
    return {"shape": SHAPE_ZH[obj.shape], "color": COLOR_ZH[obj.color], "at": position, "position": position}


def scene_question(
    scene: Scene, rng: np.random.Generator, lang: str = "en", qtype: str | None = None
) -> dict:
    """One question about ``scene``: ``{"question", "answer", "type"}``; ``qtype`` random if None.

    Objects are referred to by a unique attribute (shape or colour) or else by their grid cell.
    """
    qtype = qtype or QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    templates = QUESTIONS[lang]
    obj = scene.objects[rng.integers(len(scene.objects))]
    words = _words(obj, lang)
    if qtype == "color":
        template = templates["color_of_shape" if _unique(scene, obj, "shape") else "color_at"]
        question, answer = template.format(**words), words["color"]
    elif qtype == "shape":
        template = templates["shape_of_color" if _unique(scene, obj, "color") else "shape_at"]
        question, answer = template.format(**words), words["shape"]
    elif qtype == "count":
        if rng.random() < 0.3:
            question, answer = templates["count_all"], str(len(scene.objects))
        else:  # mostly a present shape, sometimes any shape (answer may be 0)
            shape = obj.shape if rng.random() < 0.75 else SHAPES[rng.integers(len(SHAPES))]
            question = templates["count_shape"].format(**_words(replace(obj, shape=shape), lang))
            answer = str(sum(o.shape == shape for o in scene.objects))
    elif qtype == "position":
        question = templates["position"].format(ref=referring_expression(scene, obj, lang))
        answer = words["position"]
    elif qtype == "existence":
        present = rng.random() < 0.5
        misses = near_misses(scene)
        question = existence_question(obj.name if present else misses[rng.integers(len(misses))], lang)
        answer = YES_NO[lang][0 if present else 1]
    else:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    return {"question": question, "answer": answer, "type": qtype}


def existence_pair(scene: Scene, rng: np.random.Generator, lang: str = "en") -> list[dict]:
    """Two existence questions about one scene, ``[yes, no]``: a present object and a near miss.

    On one image the answers differ only through the question, so an answer from the image alone (e.g.
    "yes" when the scene is crowded) gains nothing: the pair makes the model read the queried object.
    """
    obj = scene.objects[rng.integers(len(scene.objects))]
    misses = near_misses(scene)
    names = (obj.name, misses[rng.integers(len(misses))])
    return [
        {"question": existence_question(name, lang), "answer": YES_NO[lang][k], "type": "existence"}
        for k, name in enumerate(names)
    ]


MME_CATEGORIES = ("existence", "count", "position", "color")  # MME's perception subtasks the world has


def yes_no_pair(scene: Scene, rng: np.random.Generator, category: str) -> list[dict]:
    """MME-style: two English yes/no questions about one image, ``[yes, no]``, of one ``category``.

    MME scores a model per question (acc) and per image (acc+: both answers right), so answering from the
    image alone or always "yes" gets acc 50 and acc+ 0.
    """
    obj = scene.objects[rng.integers(len(scene.objects))]
    if category == "existence":
        questions = [qa["question"] for qa in existence_pair(scene, rng, "en")]
    elif category == "count":
        n = len(scene.objects)
        wrong = [k for k in range(1, 5) if k != n]
        questions = [
            "Is there 1 object in the image?" if k == 1 else f"Are there {k} objects in the image?"
            for k in (n, wrong[rng.integers(len(wrong))])
        ]
    elif category == "position":
        ref = referring_expression(scene, obj, "en")
        others = [p for row in POSITIONS for p in row if p != obj.position]
        questions = [f"Is {ref} {at_position(p)}?" for p in (obj.position, others[rng.integers(len(others))])]
    elif category == "color":
        others = [c for c in COLORS if c != obj.color]
        at = at_position(obj.position)
        questions = [f"Is the object {at} {c}?" for c in (obj.color, others[rng.integers(len(others))])]
    else:
        raise ValueError(f"unknown MME category {category!r}; expected one of {MME_CATEGORIES}")
    return [{"question": q, "answer": YES_NO["en"][k], "type": category} for k, q in enumerate(questions)]


CHOICE_OPTIONS = 4  # MMBench asks with up to four options, A-D


def choice_question(scene: Scene, rng: np.random.Generator) -> dict:
    """MMBench-style: a colour or shape question with four options ``{"question", "options", "answer",
    "type"}`` (``answer``: the right option's index; ``mmfactory.eval.mllm.format_choice`` asks it)."""
    qtype = ("color", "shape")[rng.integers(2)]
    qa = scene_question(scene, rng, "en", qtype)
    pool = [w for w in (COLORS if qtype == "color" else SHAPES) if w != qa["answer"]]
    distractors = [pool[i] for i in rng.permutation(len(pool))[: CHOICE_OPTIONS - 1]]
    options = [qa["answer"], *distractors]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return {
        "question": qa["question"],
        "options": options,
        "answer": options.index(qa["answer"]),
        "type": qtype,
    }


def pope_probe(scene: Scene, rng: np.random.Generator, kind: str, positive: bool) -> dict:
    """POPE yes/no probe ``{"question", "label", "object"}`` about a ``"color shape"`` object.

    Negatives are absent objects, never held-out ones: ``random`` (uniform), ``popular`` (among the most
    frequent objects of the world's prior) or ``adversarial`` (near misses: one attribute away from a
    present object).
    """
    present = scene.names()
    if positive:
        name = sorted(present)[rng.integers(len(present))]
    elif kind == "random":
        absent = sorted(name for name in object_frequency() if name not in present)
        name = absent[rng.integers(len(absent))]
    elif kind == "popular":
        by_frequency = sorted(object_frequency().items(), key=lambda kv: (-kv[1], kv[0]))
        top = [k for k, _ in by_frequency if k not in present][:POPULAR_TOP_K]
        name = top[rng.integers(len(top))]
    elif kind == "adversarial":
        misses = near_misses(scene)
        name = misses[rng.integers(len(misses))]
    else:
        raise ValueError(f"unknown POPE kind {kind!r}; expected one of {POPE_KINDS}")
    return {"question": existence_question(name, "en"), "label": "yes" if positive else "no", "object": name}


DESCRIBE = {
    "en": {"detailed": "Describe the image in detail.", "brief": "Describe the image briefly."},
    "zh": {"detailed": "详细描述这张图片。", "brief": "简要描述这张图片。"},
}


def llava_conversation(scene: Scene, rng: np.random.Generator, lang: str = "en") -> list[dict[str, str]]:
    """LLaVA-style turns ``[{"role", "content"}, ...]``: an optional description request, then questions.

    The first user turn starts with ``"<image>\\n"``; 1-3 exchanges in all.
    """
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.5:
        detail = ("brief", "detailed")[rng.integers(2)]
        turns.append((DESCRIBE[lang][detail], caption(scene, lang, detail)))
    n_turns = len(turns) + 1 + int(rng.integers(3 - len(turns)))
    for _ in range(10 * n_turns):  # draw until enough distinct questions (or give up: tiny scenes)
        qa = scene_question(scene, rng, lang)
        if qa["question"] not in {q for q, _ in turns}:
            turns.append((qa["question"], qa["answer"]))
        if len(turns) == n_turns:
            break
    messages = []
    for k, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": ("<image>\n" if k == 0 else "") + question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def wrong_answer(qa: dict, rng: np.random.Generator) -> str:
    """A plausible but wrong English answer to ``qa`` (a rejected response for preference data)."""
    options = {
        "color": list(COLORS),
        "shape": list(SHAPES),
        "position": [p for row in POSITIONS for p in row],
        "existence": ["yes", "no"],
    }.get(qa["type"]) or [str(max(0, int(qa["answer"]) + d)) for d in (-1, 1)]
    options = [o for o in options if o != qa["answer"]]
    return options[rng.integers(len(options))]
