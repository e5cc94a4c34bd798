"""Golden samples: every chat / image-chat / image-text stage of every shipped recipe reads exactly the
samples it read before the data-source layer (digests in ``golden/*.json``, taken from the per-task world
switches that the layer replaced). Tokenisation, the sampler and the collators did not
change, so equal samples mean equal batches."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from mmfactory.config import load_recipe, to_dict
from mmfactory.data.sources import read_sources
from mmfactory.recipes import list_recipes, resolve_recipe
from mmfactory.tasks import validate_stage

GOLDEN = Path(__file__).parent / "golden" / "chat_sources.json"
GOLDEN_IMAGE_TEXT = Path(__file__).parent / "golden" / "image_text_sources.json"
FIRST, LAST = 24, 8  # images hashed: the first and last samples of each collection


def runnable_recipes() -> list[str]:
    """The shipped recipes whose samples are golden: not the ``*/base`` ones (real data under ``/data`` at the
    papers' sizes, checked by tests/test_base_recipes.py)."""
    return [name for name in list_recipes() if not name.endswith("/base")]


def _digest(messages: list, images: list) -> str:
    h = hashlib.sha256()
    for conversation, stage_images in zip(messages, images, strict=True):
        h.update(json.dumps(conversation, ensure_ascii=False, sort_keys=True).encode())
        for image in stage_images:
            h.update(np.ascontiguousarray(image).tobytes())
            h.update(str(image.shape).encode())
    return h.hexdigest()


def current_digests() -> dict[str, dict]:
    out, cache = {}, {}
    for name in runnable_recipes():
        recipe = load_recipe(resolve_recipe(name))
        for i, stage in enumerate(recipe.stages):
            cls, _, data_cfg, _ = validate_stage(stage, i)
            if cls.sample_kind not in ("chat", "image-chat"):
                continue
            for split in ("train", "eval"):
                sources = data_cfg.train if split == "train" else data_cfg.eval
                if any(s.keep_uids is not None for s in sources):
                    continue  # a selection an earlier stage of the run makes (tests/filter_align)
                key = json.dumps([cls.sample_kind, to_dict(sources)], sort_keys=True)
                if key not in cache:
                    cache[key] = _digests(
                        read_sources(sources, cls.sample_kind, Counter(), split), cls.sample_kind
                    )
                if cache[key] is not None:
                    out[f"{name}:{stage.name}:{split}"] = cache[key]
    return out


def _digests(conversations, kind: str) -> dict | None:
    if conversations is None:
        return None
    n = len(conversations.messages)
    digest = {"n": n, "messages": _digest(conversations.messages, [[] for _ in range(n)])}
    if kind == "image-chat":
        indices = sorted(set(range(min(FIRST, n))) | set(range(max(0, n - LAST), n)))
        digest["images"] = _digest([[] for _ in indices], [conversations.images(i) for i in indices])
    return digest


def test_every_shipped_chat_stage_reads_the_golden_samples():
    golden = json.loads(GOLDEN.read_text())
    current = current_digests()
    assert sorted(current) == sorted(golden)
    changed = [key for key in golden if current[key] != golden[key]]
    assert not changed, f"stages whose samples changed: {changed}"


def image_text_digests() -> dict[str, dict]:
    out = {}
    for name in runnable_recipes():
        recipe = load_recipe(resolve_recipe(name))
        for i, stage in enumerate(recipe.stages):
            cls, _, data_cfg, _ = validate_stage(stage, i)
            if cls.sample_kind != "image-text":
                continue
            for split in ("train", "eval"):
                sources = data_cfg.train if split == "train" else data_cfg.eval
                if any(s.keep_uids is not None for s in sources):
                    continue  # a selection an earlier stage of the run makes (tests/filter_align)
                images = read_sources(sources, "image-text", Counter(), split)
                n = len(images)
                indices = sorted(set(range(min(FIRST, n))) | set(range(max(0, n - LAST), n)))
                pixels = hashlib.sha256()
                for j in indices:
                    pixels.update(np.ascontiguousarray(images.image(j)).tobytes())
                out[f"{name}:{stage.name}:{split}"] = {
                    "n": n,
                    "captions": hashlib.sha256(
                        json.dumps(images.captions, ensure_ascii=False).encode()
                    ).hexdigest(),
                    "images": pixels.hexdigest(),
                    "scenes": hashlib.sha256(repr(images.scenes).encode()).hexdigest(),
                }
    return out


def test_every_shipped_image_text_stage_reads_the_golden_samples():
    assert image_text_digests() == json.loads(GOLDEN_IMAGE_TEXT.read_text())


GOLDEN_OTHER = Path(__file__).parent / "golden" / "other_sources.json"
SAG_SPLITS = ("train", "eval", "benchmark", "benchmark_needs_llm", "self_improve")


def _h(obj) -> str:
    return hashlib.sha256(
        json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str).encode()
    ).hexdigest()


def _pixels(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(a.tobytes())
        h.update(str(a.shape).encode())
    return h.hexdigest()


def _edges(n: int) -> list[int]:
    return sorted(set(range(min(FIRST, n))) | set(range(max(0, n - LAST), n)))


def other_digests(only: tuple[str, ...] = ()) -> dict[str, dict]:
    """Digests of the video-text, labelled-image, preference and article stages, as in
    ``golden/other_sources.json`` (ARM images as the task fits them to its encoder)."""
    from mmfactory.data.images import FittedImages
    from mmfactory.data.video_text import video_clip

    out = {}
    for name in runnable_recipes():
        if name == "arm/fashion_mnist":  # its IDX files are not on a test machine
            continue
        recipe = load_recipe(resolve_recipe(name))
        for i, stage in enumerate(recipe.stages):
            cls, model_cfg, data_cfg, _ = validate_stage(stage, i)
            kind = cls.sample_kind
            if kind not in ("video-text", "labelled-image", "preference", "article") or (
                only and kind not in only
            ):
                continue
            splits = SAG_SPLITS if kind == "article" else ("train", "eval")
            for split in splits:
                samples = read_sources(getattr(data_cfg, split), kind, Counter(), split)
                n, items = len(samples), samples.items
                if kind == "video-text":
                    clips = [
                        video_clip(samples.media(j), data_cfg.num_frames, "uniform", None) for j in _edges(n)
                    ]
                    digest = {"captions": _h([it["captions"] for it in items]), "clips": _pixels(clips)}
                elif kind == "labelled-image":
                    enc = model_cfg.encoder
                    fitted = FittedImages(samples, enc.image_size, enc.in_channels)
                    digest = {
                        "classes": samples.classes,
                        "labels": _h([it["label"] for it in items]),
                        "images": _pixels([fitted[j]["image"] for j in _edges(n)]),
                    }
                elif kind == "preference":
                    text = [[it["prompt"], it["chosen"], it["rejected"]] for it in items]
                    digest = {"text": _h(text), "images": _pixels([samples.media(j)[0] for j in _edges(n)])}
                else:
                    digest = {"articles": _h(items)}
                out[f"{name}:{stage.name}:{split}"] = {"n": n, **digest}
    return out


def test_every_shipped_video_labelled_preference_and_article_stage_reads_the_golden_samples():
    golden = json.loads(GOLDEN_OTHER.read_text())
    current = other_digests()
    assert sorted(current) == sorted(golden)
    assert [key for key in golden if current[key] != golden[key]] == []
