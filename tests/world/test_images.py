import re

import numpy as np
import pytest

from mmfactory.data.benchmarks import CHOICE_LETTERS, format_choice
from mmfactory.world import World
from mmfactory.world.captions import at_position, caption
from mmfactory.world.rng import item_rng
from mmfactory.world.scenes import COLORS, HELD_OUT, RADIUS, render_scene, sample_scene
from mmfactory.world.vqa import POPE_KINDS, QUESTION_TYPES, scene_question


def test_same_seed_same_items_different_seed_differs():
    a, b, c = World(seed=0), World(seed=0), World(seed=1)
    for x, y in zip(a.llava("train", 6), b.llava("train", 6), strict=True):
        np.testing.assert_array_equal(x["images"][0], y["images"][0])
        assert x["conversations"] == y["conversations"]
    assert any(
        not np.array_equal(x["image"], z["image"])
        for x, z in zip(a.pairs("train", 6), c.pairs("train", 6), strict=True)
    )


def test_items_do_not_depend_on_how_many_are_drawn():
    w = World()
    few, many = w.vqa("val", 3), w.vqa("val", 10)
    for x, y in zip(few, many[:3], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert (x["question"], x["answer"]) == (y["question"], y["answer"])


def test_image_shape_dtype_and_size():
    item = World(image_size=64).pairs("train", 1)[0]
    assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.uint8


def test_compositional_split_holds_combinations_out():
    w = World()
    for split in ("train", "val", "test"):
        for i in range(200):
            assert not {(o.shape, o.color) for o in w.scene(split, i).objects} & HELD_OUT
    for i in range(50):
        assert {(o.shape, o.color) for o in w.scene("test_compositional", i).objects} & HELD_OUT


def test_no_text_of_the_regular_splits_names_a_held_out_combination():
    w = World()
    held_out_names = {f"{c} {s}" for s, c in HELD_OUT}
    texts = [c for r in w.rankings("train", 40) for c in r["captions"]]
    texts += [p["object"] for kind in POPE_KINDS for p in w.pope("train", 40, kind)]
    texts += [q["question"] for q in w.vqa("train", 40)]
    texts += [p["rejected"] for p in w.preference("train", 40)]
    assert not [t for t in texts if any(name in t for name in held_out_names)]


def _object_pixel(image: np.ndarray, obj, size: int) -> np.ndarray:
    """A pixel surely inside the object: its centre, or on the band for rings."""
    x = obj.x + (0.8 * RADIUS[obj.size] if obj.shape == "ring" else 0.0)
    return image[int(obj.y * size), int(x * size)]


def test_rendered_objects_have_their_colour():
    for i in range(30):
        scene = sample_scene(item_rng(0, "t", i))
        image = render_scene(scene, 64)
        for obj in scene.objects:
            np.testing.assert_array_equal(_object_pixel(image, obj, 64), COLORS[obj.color])


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_vqa_answers_match_the_scene(qtype):
    for i in range(40):
        rng = item_rng(0, "q", i)
        scene = sample_scene(rng)
        qa = scene_question(scene, rng, "en", qtype)
        q, a = qa["question"], qa["answer"]
        if qtype == "color":
            matches = [o for o in scene.objects if f"the {o.shape}?" in q or o.position in q]
            image = render_scene(scene, 64)
            assert any(o.color == a for o in matches)
            assert any(np.array_equal(_object_pixel(image, o, 64), COLORS[a]) for o in matches)
        elif qtype == "count":
            counted = [o for o in scene.objects if q == "How many objects are there?" or f" {o.shape}" in q]
            assert int(a) == len(counted)
        elif qtype == "existence":
            name = re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", q).group(1)
            assert a == ("yes" if name in scene.names() else "no")
        elif qtype == "shape":
            assert a in {o.shape for o in scene.objects}
        else:
            assert a in {o.position for o in scene.objects}


@pytest.mark.parametrize("kind", POPE_KINDS)
def test_pope_negatives_are_absent_and_positives_present(kind):
    w = World()
    probes = w.pope("test", 30, kind)
    assert [p["label"] for p in probes] == ["yes", "no"] * 15
    for i, p in enumerate(probes):
        names = w.scene("test", i).names()
        assert (p["object"] in names) == (p["label"] == "yes")
        if kind == "adversarial" and p["label"] == "no":  # near miss: shares colour or shape with one present
            color, shape = p["object"].split()
            assert any(n.startswith(color + " ") or n.endswith(" " + shape) for n in names)


def test_existence_pairs_ask_a_present_object_and_a_near_miss_on_one_image():
    w = World()
    items = w.existence_pairs("train", 41)  # odd: the last scene gives its yes question only
    assert len(items) == 41 and [q["answer"] for q in items] == ["yes", "no"] * 20 + ["yes"]
    for k, q in enumerate(items):
        scene = w.scene("train", k // 2)
        assert q["id"] == f"train-{k // 2:06d}"
        assert np.array_equal(q["image"], render_scene(scene, w.image_size))
        name = re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", q["question"]).group(1)
        assert (name in scene.names()) == (q["answer"] == "yes")
        if q["answer"] == "no":  # a near miss: one attribute away from a present object
            color, shape = name.split()
            assert any(n.startswith(color + " ") or n.endswith(" " + shape) for n in scene.names())
    zh = w.existence_pairs("train", 2, lang="zh")
    assert [q["answer"] for q in zh] == ["有", "没有"] and zh[0]["question"].startswith("图中有")


def test_mme_pairs_are_true_then_false_about_one_image_of_one_category():
    w = World()
    items = w.yes_no_pairs("val", 16)
    assert [q["answer"] for q in items] == ["yes", "no"] * 8
    assert [q["type"] for q in items[::2]] == ["existence", "count", "position", "color"] * 2
    for k in range(0, 16, 2):
        yes, no = items[k], items[k + 1]
        scene = w.scene("val", k // 2)
        assert yes["pair"] == no["pair"] == k // 2 and yes["question"] != no["question"]
        if yes["type"] == "count":
            number = int(re.search(r"(\d) object", yes["question"]).group(1))
            assert number == len(scene.objects) != int(re.search(r"(\d) object", no["question"]).group(1))
        if yes["type"] == "color":
            place, color = re.fullmatch(r"Is the object (.+) (\w+)\?", yes["question"]).groups()
            assert any(at_position(o.position) == place and o.color == color for o in scene.objects)
            assert no["question"].startswith(f"Is the object {place} ") and not no["question"].endswith(
                f" {color}?"
            )


def test_multiple_choice_rotations_move_the_right_letter_with_its_option():
    item = World().choices("train", 3)[2]
    assert len(item["options"]) == len(CHOICE_LETTERS) == len(set(item["options"]))
    seen = set()
    for shift in range(4):
        prompt, letter = format_choice(item, shift)
        line = next(x for x in prompt.splitlines() if x.startswith(f"{letter}. "))
        assert line == f"{letter}. {item['options'][item['answer']]}"
        seen.add(letter)
    assert seen == set(CHOICE_LETTERS)  # the right option takes every position once


def test_llava_and_pairs_follow_the_formats():
    w = World()
    item = w.llava("train", 1)[0]
    roles = [m["role"] for m in item["conversations"]]
    assert roles[::2] == ["user"] * (len(roles) // 2) and roles[1::2] == ["assistant"] * (len(roles) // 2)
    assert item["conversations"][0]["content"].startswith("<image>\n")
    pair = w.pairs("train", 1, lang="zh")[0]
    assert pair["text"] == caption(w.scene("train", 0), "zh")
