"""A small byte-level BPE tokenizer trained on the world's English + Chinese text, cached on disk."""

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmfactory.world.articles import article
from mmfactory.world.audio import audio_caption, audio_question, sample_sounds
from mmfactory.world.captions import LANGS, caption
from mmfactory.world.rankings import image_preference, ranked_captions
from mmfactory.world.rng import item_rng
from mmfactory.world.scenes import sample_scene
from mmfactory.world.text import chat_samples
from mmfactory.world.video import clip_captions, sample_clip, video_question
from mmfactory.world.vqa import DESCRIBE, POPE_KINDS, pope_probe, scene_question

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (
    EOS,
    PAD,
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
    "<audio>",
    "<img>",
    "</img>",
    "<vis>",
    "</vis>",
    "<aud>",
    "</aud>",
)
VOCAB_SIZE = 3000
CORPUS_ITEMS = 600  # items per text source; the corpus is built from world seed 0, train split
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def world_corpus(n: int = CORPUS_ITEMS) -> Iterator[str]:
    """Every kind of text the world writes (captions, questions, answers, articles, chats), EN + ZH.

    Built from the text generators directly (nothing is rendered), from world seed 0.
    """
    for i in range(n):
        rng = item_rng(0, "corpus", i)
        scene = sample_scene(rng)
        for lang in LANGS:
            yield caption(scene, lang, "brief")
            yield caption(scene, lang, "detailed")
            yield from DESCRIBE[lang].values()
            qa = scene_question(scene, rng, lang)
            yield f"{qa['question']} {qa['answer']}"
            a = article(0, "train", i, lang)
            yield from (a["draft"], a["reference"], *a["variants"].values())
        yield pope_probe(scene, rng, POPE_KINDS[i % 3], positive=False)["question"]
        yield from ranked_captions(scene, rng)["captions"]
        yield " ".join(image_preference(scene, rng).values())
        clip = sample_clip(rng)
        for lang in LANGS:
            yield from clip_captions(clip, lang)
        qa = video_question(clip, rng)
        yield f"{qa['question']} {qa['answer']}"
        yield _av_question_as_built(clip, rng)
        sounds = sample_sounds(rng, duration_s=1.0)
        for lang in LANGS:
            yield audio_caption(sounds, lang)
        qa = audio_question(sounds, rng)
        yield f"{qa['question']} {qa['answer']}"
    for sample in chat_samples("train", n):
        yield from (m["content"] for m in sample["messages"])


def _av_question_as_built(clip, rng: np.random.Generator) -> str:
    """The audio-visual question and answer the corpus was built with, drawn as they were before
    :func:`~mmfactory.world.video.av_question` kept to clips where one stream alone is at chance: the same
    draws and text, so the corpus, and with it the world tokenizer every trained model uses, stay as they
    are (the tokenizer's cache name is a digest of the corpus)."""
    sounding = [t for t in clip.tracks if t.sounding]
    options = ["av_existence"]
    options += ["av_color"] if len(sounding) == 1 and sounding[0].event != "changes_color" else []
    options += ["av_position"] if len(sounding) == 1 and sounding[0].visible_at(0) else []
    qtype = options[rng.integers(len(options))]
    if qtype == "av_color":
        return f"What color is the object making a sound? {sounding[0].color}"
    if qtype == "av_position":
        position = sounding[0].object_at(0, clip.frames).position
        return f"Where is the object making a sound at the start? {position}"
    track = clip.tracks[rng.integers(len(clip.tracks))]
    return f"Is the {track.color} object making a sound? {'yes' if track.sounding else 'no'}"


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE with SPECIAL_TOKENS first (ids 0..12).

    Pre-tokenization: runs of Chinese characters are split from other text, then GPT-2 style byte-level
    splitting without a prefix space (so "Zeno背包" becomes "Zeno" + "背包", never one token).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{Han}+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """transformers wrapper: eos ``<|endoftext|>``, pad ``<|pad|>``, ChatML chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
        chat_template=CHAT_TEMPLATE,
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMFACTORY_CACHE") or Path.home() / ".cache" / "mmfactory")


@functools.lru_cache(maxsize=4)
def _tokenizer_dir(cache_dir: Path, vocab_size: int) -> Path:
    corpus = list(world_corpus())
    settings = {"vocab_size": vocab_size, "special": SPECIAL_TOKENS, "tokenizers": tokenizers.__version__}
    digest = hashlib.sha256(json.dumps(settings).encode())
    for text in corpus:
        digest.update(text.encode() + b"\0")
    path = cache_dir / "tokenizers" / f"world-{digest.hexdigest()[:16]}"
    if not (path / "tokenizer.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        tmp.chmod(0o755)
        wrap(train_tokenizer(corpus, vocab_size)).save_pretrained(tmp)
        try:
            tmp.rename(path)  # atomic; a concurrent writer that finished first wins
        except OSError:
            shutil.rmtree(tmp)
    return path


def world_tokenizer(cache_dir: str | None = None, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The world tokenizer, trained on first use (seconds) and then loaded from
    ``{cache_dir or $MMFACTORY_CACHE or ~/.cache/mmfactory}/tokenizers/world-<hash>``."""
    path = _tokenizer_dir(Path(cache_dir) if cache_dir else default_cache_dir(), vocab_size)
    return PreTrainedTokenizerFast.from_pretrained(path)
