"""The built-in procedural multimodal world: deterministic images, videos, audio and text from a seed.

Every item is a pure function of ``(seed, split, index)``: ``World(seed=0).vqa("train", 8)[3]`` is the
same whether 8 or 8000 items are drawn. Image tasks (llava, pairs, vqa, pope, rankings, preference)
share scene ``index`` of a split, so item ``i`` of each is about the same image; video tasks share clip
``i`` and audio tasks clip ``i`` likewise. Sample dicts have the keys the ``mmfactory.data.readers``
return for the exported files (``docs/formats.md``): decoded media under ``image`` (uint8 [H, W, 3];
``images: [image]`` for llava), ``video`` (uint8 [T, H, W, 3]) and ``audio`` (float32 [S], with
``sample_rate``); ground truth the files do not carry (objects, tracks, sounds, kinds, Chinese captions)
rides along under extra keys.

Splits: ``train``, ``val``, ``test``; images also ``test_compositional``, whose scenes each hold a
(shape, colour) combination (``scenes.HELD_OUT``) that no other split shows or names.
"""

from collections.abc import Callable
from dataclasses import dataclass

from mmfactory.world.articles import article, article_preference, extract_claims
from mmfactory.world.audio import SAMPLE_RATE, audio_clip, audio_qa_item
from mmfactory.world.captions import caption
from mmfactory.world.rankings import graded_caption, image_preference, pool_kinds, ranked_captions
from mmfactory.world.rng import IMAGE_SPLITS, check_split, item_rng
from mmfactory.world.scenes import Scene, render_scene, scene_at
from mmfactory.world.text import chat_samples
from mmfactory.world.tokenizer import world_tokenizer
from mmfactory.world.video import (
    av_question,
    av_which_question,
    clip_at,
    video_question,
    video_sample,
)
from mmfactory.world.vqa import (
    MME_CATEGORIES,
    POPE_KINDS,
    choice_question,
    existence_pair,
    llava_conversation,
    pope_probe,
    scene_question,
    yes_no_pair,
)


@dataclass(frozen=True)
class World:
    """Configuration of the world; methods return lists of sample dicts.

    Args:
        seed: the world seed; two worlds with the same settings produce identical items.
        image_size: side of rendered images (pixels).
        max_objects: most objects in an image scene (1..8).
        video_frames: frames per clip (T).
        video_size: side of video frames (pixels).
        fps: video frame rate; a clip lasts ``video_frames / fps`` seconds, and so does its audio.
        max_video_objects: most objects in a clip.
        audio_seconds: length of audio-only clips.
    """

    seed: int = 0
    image_size: int = 32
    max_objects: int = 4
    video_frames: int = 8
    video_size: int = 32
    fps: float = 8.0
    max_video_objects: int = 3
    audio_seconds: float = 1.0

    # --- images -------------------------------------------------------------------------------
    def scene(self, split: str, index: int) -> Scene:
        return scene_at(self.seed, split, index, self.max_objects)

    def _image_items(self, split: str, n: int, build: Callable[[Scene, int], dict]) -> list[dict]:
        """``{"id", "image", "objects", "background", **build(scene, index)}`` for scenes 0..n-1."""
        check_split(split, IMAGE_SPLITS)
        items = []
        for i in range(n):
            scene = self.scene(split, i)
            items.append(
                {
                    "id": f"{split}-{i:06d}",
                    "image": render_scene(scene, self.image_size),
                    "objects": [o.to_dict() for o in scene.objects],
                    "background": scene.background,
                    **build(scene, i),
                }
            )
        return items

    def llava(self, split: str, n: int, lang: str = "en") -> list[dict]:
        """``{"id", "images": [image], "conversations": [{"role", "content"}, ...]}`` as ``read_llava``
        returns them; the first user turn opens with ``"<image>\\n"``."""
        items = self._image_items(
            split,
            n,
            lambda s, i: {
                "conversations": llava_conversation(s, item_rng(self.seed, "llava", split, i), lang)
            },
        )
        return [{"images": [item.pop("image")], **item} for item in items]

    def pairs(self, split: str, n: int, lang: str = "en", detail: str = "detailed") -> list[dict]:
        """Image-text pairs ``{"id", "image", "text"}``; ``detail`` brief or detailed."""
        return self._image_items(split, n, lambda s, i: {"text": caption(s, lang, detail)})

    def vqa(self, split: str, n: int, lang: str = "en") -> list[dict]:
        """``{"id", "image", "question", "answer", "type"}``, one question per image."""
        return self._image_items(
            split, n, lambda s, i: scene_question(s, item_rng(self.seed, "vqa", split, i), lang)
        )

    def _question_pairs(self, split: str, n: int, make) -> list[dict]:
        """``n`` questions on ``ceil(n / 2)`` scenes: items ``2k`` and ``2k + 1`` are the two questions
        ``make(scene, k)`` asks about scene ``k``'s image, with ``"pair": k``."""
        items = self._image_items(split, -(-n // 2), lambda s, i: {"qas": make(s, i), "pair": i})
        qas = [item.pop("qas") for item in items]
        return [{**item, **qa} for item, pair in zip(items, qas, strict=True) for qa in pair][:n]

    def existence_pairs(self, split: str, n: int, lang: str = "en") -> list[dict]:
        """``n`` existence questions ``{"id", "image", "question", "answer", "type", "pair"}``: items ``2k``
        (yes) and ``2k + 1`` (no, a near miss) share scene ``k``'s image."""
        return self._question_pairs(
            split, n, lambda s, i: existence_pair(s, item_rng(self.seed, "existence", split, i), lang)
        )

    def yes_no_pairs(self, split: str, n: int) -> list[dict]:
        """MME-style pairs ``{"id", "image", "question", "answer", "type", "pair"}`` (English): items ``2k``
        (yes) and ``2k + 1`` (no) share scene ``k``'s image and category (``MME_CATEGORIES`` in turn)."""
        return self._question_pairs(
            split,
            n,
            lambda s, i: yes_no_pair(
                s, item_rng(self.seed, "mme", split, i), MME_CATEGORIES[i % len(MME_CATEGORIES)]
            ),
        )

    def choices(self, split: str, n: int) -> list[dict]:
        """MMBench-style questions ``{"id", "image", "question", "options", "answer", "type"}`` (English;
        ``answer``: the right option's index; :func:`~mmfactory.eval.mllm.format_choice` asks them)."""
        return self._image_items(
            split, n, lambda s, i: choice_question(s, item_rng(self.seed, "choice", split, i))
        )

    def pope(self, split: str, n: int, kind: str = "random") -> list[dict]:
        """POPE probes ``{"id", "image", "question", "label", "object"}``; even items yes, odd items no."""
        if kind not in POPE_KINDS:
            raise ValueError(f"unknown POPE kind {kind!r}; expected one of {POPE_KINDS}")
        return self._image_items(
            split,
            n,
            lambda s, i: pope_probe(
                s, item_rng(self.seed, "pope", kind, split, i), kind, positive=i % 2 == 0
            ),
        )

    def rankings(self, split: str, n: int) -> list[dict]:
        """``{"id", "image", "captions", "ranks", "kinds"}``: graded captions, rank 1 best, ties allowed."""
        return self._image_items(
            split, n, lambda s, i: ranked_captions(s, item_rng(self.seed, "ranking", split, i))
        )

    def web_pool(self, n: int, bad_fraction: float = 0.5) -> tuple[list[dict], list[dict]]:
        """A web-scraped-like pool: ``([{"uid", "image", "text"}], [{"uid", "aligned", "kind"}])``.

        Exactly ``round(n * bad_fraction)`` pairs are misaligned or low quality (wrong attribute,
        unrelated caption, alt-text noise); the rest carry a brief or detailed correct caption.
        """
        kinds = pool_kinds(n, bad_fraction, item_rng(self.seed, "pool-kinds", n, repr(bad_fraction)))
        pairs, truth = [], []
        for i, kind in enumerate(kinds):
            scene = self.scene("pool", i)
            uid = f"pool-{i:06d}"
            text = graded_caption(scene, kind, item_rng(self.seed, "pool", i))
            pairs.append({"uid": uid, "image": render_scene(scene, self.image_size), "text": text})
            truth.append({"uid": uid, "aligned": kind in ("detailed", "brief"), "kind": kind})
        return pairs, truth

    def preference(self, split: str, n: int, source: str = "image", lang: str = "en") -> list[dict]:
        """``{"id", "prompt", "chosen", "rejected"}`` (+ ``"image"`` for ``source="image"``).

        ``image``: faithful vs hallucinated descriptions or answers (LLaVA-MoD preference distillation);
        ``article``: faithful vs hallucinated styled notes for a draft (SAG's C-DPO), in ``lang``.
        """
        if source == "article":
            check_split(split)
            return [article_preference(self.seed, split, i, lang) for i in range(n)]
        if source != "image":
            raise ValueError(f"unknown preference source {source!r}; expected 'image' or 'article'")
        return self._image_items(
            split, n, lambda s, i: image_preference(s, item_rng(self.seed, "preference", split, i))
        )

    # --- video and audio ----------------------------------------------------------------------
    def _clip(self, split: str, index: int):
        return clip_at(self.seed, split, index, self.video_frames, self.max_video_objects)

    def video(self, split: str, index: int) -> dict:
        """Clip ``index`` of ``split`` as :meth:`videos` returns it."""
        return video_sample(self._clip(split, index), f"{split}-{index:06d}", self.video_size, self.fps)

    def videos(self, split: str, n: int) -> list[dict]:
        """``{"video_id", "video", "audio", "sample_rate", "captions", "captions_zh", "tracks",
        "background"}``."""
        return [self.video(split, i) for i in range(n)]

    def video_qa(self, split: str, n: int) -> list[dict]:
        """A video (with its audio) plus ``"question", "answer", "type"`` about what is seen."""
        return [
            {
                **self.video(split, i),
                **video_question(self._clip(split, i), item_rng(self.seed, "vqa-video", split, i)),
            }
            for i in range(n)
        ]

    def av_qa(self, split: str, n: int) -> list[dict]:
        """Up to ``n`` videos (of the first ``n`` clips) plus a question answerable only with both the frames
        and the audio track (:func:`~mmfactory.world.video.av_question`); clips it does not fit are left
        out."""
        items = []
        for i in range(n):
            question = av_question(self._clip(split, i), item_rng(self.seed, "av-qa", split, i))
            if question is not None:
                items.append({**self.video(split, i), **question})
        return items

    def av_which(self, split: str, n: int) -> list[dict]:
        """Up to ``n`` videos (of the first ``n`` clips) with the zero-shot probe "Which object is making a
        sound?" (:func:`~mmfactory.world.video.av_which_question`); clips it does not fit are left out."""
        items = []
        for i in range(n):
            question = av_which_question(self._clip(split, i))
            if question is not None:
                items.append({**self.video(split, i), **question})
        return items

    def audio_clips(self, split: str, n: int) -> list[dict]:
        """``{"id", "audio", "sample_rate", "caption", "caption_zh", "sounds"}`` (16 kHz mono float32)."""
        return [audio_clip(self.seed, split, i, self.audio_seconds) for i in range(n)]

    def audio_qa(self, split: str, n: int) -> list[dict]:
        """An audio clip plus ``"question", "answer", "type"`` (count, source, pitch, existence)."""
        return [audio_qa_item(self.seed, split, i, self.audio_seconds) for i in range(n)]

    # --- text ---------------------------------------------------------------------------------
    def articles(self, split: str, n: int, lang: str = "en") -> list[dict]:
        """``{"id", "lang", "facts", "draft", "reference", "variants", "variant_attributes"}``."""
        return [article(self.seed, split, i, lang) for i in range(n)]

    def chat(self, split: str, n: int) -> list[dict]:
        """Text-only ``{"id", "kind", "messages"}`` for language-model warm-up."""
        return chat_samples(split, n, self.seed)


__all__ = ["SAMPLE_RATE", "World", "chat_samples", "extract_claims", "world_tokenizer"]
