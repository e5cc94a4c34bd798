"""Audio-visual chat data (sample kind ``av-chat``): conversations about a video, an audio clip or both.

A source yields :class:`~mmfactory.data.samples.Samples` whose items are ``{"id", "messages"}`` and whose
media are ``{"video": uint8 [T, H, W, 3] or None, "audio": float32 [S] (or [S, C]) or None,
"sample_rate": int or None, "images"?: [uint8 [H, W, 3], ...]}`` (images for ``<image>`` placeholders).
The first user turn holds a ``<video>`` placeholder where the video goes and an ``<audio>`` one where the
audio goes; which placeholders a sample holds is its modality (visual-only, audio-only or audio-visual),
and its media must carry those streams.

:class:`AVProcessor` expands each placeholder into the tokens the model fills. With modality tokens
(Audio-Visual LLM's modality-augmented training) a sample reads::

    <audio_visual> <vis> <video> x Nv </vis> <aud> <audio> x Na </aud> question ...
    <visual_only>  <vis> <video> x Nv </vis> question ...
    <audio_only>   <aud> <audio> x Na </aud> question ...

the marker naming the streams the sample carries, so one model learns from a mixture of the three and
knows which encoders spoke; without them only the placeholders remain (the ablation). None of these
tokens is learned. Videos are sampled to ``video_frames`` frames (uniform, TSN-style) and turned into the
tower's pixels, audio into log-mel features, in the collate function (DataLoader workers), and only for
the samples that carry them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import WhisperFeatureExtractor

from mmfactory.data.chat import IGNORE_INDEX, TokenizedChat, collate_chats, generation_prompt, tokenize_chat
from mmfactory.data.media import frame_indices, log_mel
from mmfactory.data.multimodal import MultimodalProcessor, counted_fit, expand_placeholders
from mmfactory.data.policy import BadReason, BadSampleError
from mmfactory.data.samples import Samples

VIDEO_TOKEN, AUDIO_TOKEN = "<video>", "<audio>"
VIDEO_SPAN, AUDIO_SPAN = ("<vis>", "</vis>"), ("<aud>", "</aud>")
MODALITY_MARKERS = {"video": "<visual_only>", "audio": "<audio_only>", "audio-visual": "<audio_visual>"}
MODALITY_TOKENS = (*VIDEO_SPAN, *AUDIO_SPAN, *MODALITY_MARKERS.values())
AV_PROCESSOR_META = "mmfactory_av_processor.json"
AUDIO_PREPROCESSOR_FILE = "audio_preprocessor_config.json"  # beside the image processor's file
SILENCE_PEAK = 1e-4  # an audio clip whose peak amplitude stays below this carries no sound


def modality(messages: list[dict[str, str]]) -> str | None:
    """``video``, ``audio``, ``audio-visual`` or None: the streams a conversation's placeholders ask for."""
    text = "".join(m["content"] for m in messages)
    streams = (VIDEO_TOKEN in text, AUDIO_TOKEN in text)
    return {(True, False): "video", (False, True): "audio", (True, True): "audio-visual"}.get(streams)


def check_av_media(messages: list[dict[str, str]], media: dict) -> None:
    """Raise :class:`BadSampleError` when the media lack a stream the text asks for (a video without an
    audio track in an audio-visual sample, say) or the audio is silent (peak below :data:`SILENCE_PEAK`)."""
    streams = modality(messages)
    if streams in ("video", "audio-visual") and media.get("video") is None:
        raise BadSampleError("a <video> placeholder but no video", reason=BadReason.MISSING_FILE)
    if streams in ("audio", "audio-visual"):
        audio = media.get("audio")
        if audio is None:
            raise BadSampleError("an <audio> placeholder but no audio track", reason=BadReason.MISSING_AUDIO)
        if len(audio) == 0 or float(np.abs(audio).max()) < SILENCE_PEAK:
            raise BadSampleError("the audio track is silent", reason=BadReason.SILENT_AUDIO)


@dataclass
class AVSample(TokenizedChat):
    """A tokenised conversation (placeholders expanded) and its media: video and audio (or None) and the
    images of its ``<image>`` placeholders (a reader that yields images in its media gets image-only
    samples batched beside audio-visual ones; the world's and the file readers' av-chat kinds have none)."""

    video: np.ndarray | None = None
    audio: np.ndarray | None = None
    sample_rate: int | None = None
    images: list[np.ndarray] = field(default_factory=list)


@dataclass
class AVProcessor:
    """Text, videos and audio of a conversation -> model inputs; also builds generation prompts.

    Args:
        base: the image processor side (tokenizer, chat template, the vision tower's image processor).
        feature_extractor: the audio tower's log-mel front end.
        video_frames: frames per video (``T``).
        num_video_tokens, num_audio_tokens: placeholder tokens per video / audio clip (the model's).
        modality_tokens: wrap spans in ``<vis>``/``<aud>`` and mark each sample's modality (see the module
            docstring); False: placeholders only.
    """

    base: MultimodalProcessor
    feature_extractor: WhisperFeatureExtractor
    video_frames: int
    num_video_tokens: int
    num_audio_tokens: int
    modality_tokens: bool = True

    def __post_init__(self) -> None:
        tokenizer = self.base.tokenizer
        names = (VIDEO_TOKEN, AUDIO_TOKEN, *MODALITY_TOKENS)
        ids = {name: tokenizer.encode(name, add_special_tokens=False) for name in names}
        split = [name for name, i in ids.items() if len(i) != 1]
        if split:
            raise ValueError(f"the tokenizer splits {split}; add them as special tokens")
        self.token_ids = {name: i[0] for name, i in ids.items()}
        self.video_token_id, self.audio_token_id = ids[VIDEO_TOKEN][0], ids[AUDIO_TOKEN][0]

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def template(self):
        return self.base.template

    # -- text ------------------------------------------------------------------------------------
    def _span(self, placeholder: str) -> list[int]:
        count = self.num_video_tokens if placeholder == VIDEO_TOKEN else self.num_audio_tokens
        ids = [self.token_ids[placeholder]] * count
        if not self.modality_tokens:
            return ids
        begin, end = VIDEO_SPAN if placeholder == VIDEO_TOKEN else AUDIO_SPAN
        return [self.token_ids[begin], *ids, self.token_ids[end]]

    def _expand(self, ids: list[int], labels: list[int], stream: str | None) -> tuple[list[int], list[int]]:
        """Images via the base processor; each video / audio placeholder -> its span, the modality marker
        before the first span; none of them learned."""
        ids, labels = self.base._expand(ids, labels)
        spans = {
            token: self._span(name)
            for name, token in ((VIDEO_TOKEN, self.video_token_id), (AUDIO_TOKEN, self.audio_token_id))
        }
        ids, labels = expand_placeholders(ids, labels, spans)
        if self.modality_tokens and stream:
            first = next(
                i
                for i, t in enumerate(ids)
                if t in (self.token_ids[VIDEO_SPAN[0]], self.token_ids[AUDIO_SPAN[0]])
            )
            ids.insert(first, self.token_ids[MODALITY_MARKERS[stream]])
            labels.insert(first, IGNORE_INDEX)
        return ids, labels

    def tokenize(self, messages: list[dict[str, str]]) -> TokenizedChat:
        """The whole conversation, placeholders expanded, labels on assistant replies (not truncated)."""
        chat = tokenize_chat(messages, self.tokenizer, self.template)
        return TokenizedChat(*self._expand(chat.input_ids, chat.labels, modality(messages)), truncated=False)

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation so far plus an open assistant turn, placeholders expanded."""
        ids = generation_prompt(messages, self.tokenizer, self.template)
        return self._expand(ids, ids, modality(messages))[0]

    def fit(self, chat: TokenizedChat, max_length: int) -> TokenizedChat | None:
        """Right-truncate to ``max_length``; None when the cut would fall in or before a media span."""
        if len(chat.input_ids) <= max_length:
            return chat
        media = {self.video_token_id, self.audio_token_id, self.base.image_token_id, *self.token_ids.values()}
        if media & set(chat.input_ids[max_length:]):  # a placeholder, a span delimiter or a marker
            return None
        return TokenizedChat(chat.input_ids[:max_length], chat.labels[:max_length], truncated=True)

    # -- media -----------------------------------------------------------------------------------
    def video_values(self, videos: list[np.ndarray]) -> torch.Tensor:
        """uint8 ``[T_i, H, W, 3]`` videos -> ``[Nv * video_frames, 3, S, S]``: each video's frames sampled
        uniformly (the last one repeated when it is short), video by video."""
        frames = [v[i] for v in videos for i in frame_indices(len(v), self.video_frames, "uniform")]
        return self.base.pixel_values(frames)

    def audio_features(self, clips: list[np.ndarray], sample_rates: list[int]) -> torch.Tensor:
        """Waveforms (any rate, mono or channels-last stereo) -> log-mel ``[A, M, L]``."""
        return log_mel(self.feature_extractor, clips, sample_rates)

    def media_inputs(self, media: list[dict]) -> dict[str, torch.Tensor]:
        """``pixel_values`` (the items' ``images``, in order), ``video_values`` and ``audio_features`` of
        the items that carry each stream."""
        videos = [m["video"] for m in media if m.get("video") is not None]
        audio = [m for m in media if m.get("audio") is not None]
        return {
            **self.base.media_inputs([m.get("images", []) for m in media]),
            "video_values": self.video_values(videos),
            "audio_features": self.audio_features(
                [m["audio"] for m in audio], [m["sample_rate"] for m in audio]
            ),
        }

    def collate(
        self, samples: list[AVSample], pad_to_multiple_of: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels``, ``attention_mask`` ``[B, T]`` (right-padded) plus the inputs of
        :meth:`media_inputs`: a visual-only sample adds frames only, an audio-only one a clip only."""
        batch = collate_chats(samples, self.tokenizer.pad_token_id, pad_to_multiple_of)
        media = [
            {"video": s.video, "audio": s.audio, "sample_rate": s.sample_rate, "images": s.images}
            for s in samples
        ]
        return {**batch, **self.media_inputs(media)}

    # -- files -----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        self.base.save_pretrained(folder)
        self.feature_extractor.to_json_file(str(Path(folder) / AUDIO_PREPROCESSOR_FILE))
        meta = {"modality_tokens": self.modality_tokens}
        (Path(folder) / AV_PROCESSOR_META).write_text(json.dumps(meta))

    @classmethod
    def from_pretrained(cls, folder: str | Path, model_config) -> AVProcessor:
        """The processor saved with an :class:`~mmfactory.models.av_llm.AudioVisualLM` folder."""
        folder = Path(folder)
        meta = json.loads((folder / AV_PROCESSOR_META).read_text())
        return cls(
            MultimodalProcessor.from_pretrained(folder, model_config.num_image_tokens),
            WhisperFeatureExtractor.from_json_file(str(folder / AUDIO_PREPROCESSOR_FILE)),
            model_config.video_frames,
            model_config.num_video_tokens,
            model_config.audio_tokens,
            meta["modality_tokens"],
        )


class AVChatDataset(Dataset):
    """``av-chat`` samples tokenised once (placeholders expanded, fitted to ``max_length``); media per item.

    ``counts`` receives ``{split}/samples``, ``{split}/samples_<modality>``, ``{split}/truncated``,
    ``{split}/skipped_media_cut`` (a span would not fit) and ``{split}/skipped_no_reply_tokens``. Media
    are checked (:func:`check_av_media`) when drawn; readers of files check them when they read (their
    ``on_bad_sample`` policy), so an error here names a record a reader let through.
    """

    def __init__(
        self,
        source: Samples,
        processor: AVProcessor,
        max_length: int,
        counts: Counter[str],
        split: str = "train",
    ):
        self.source = source
        self.split = split
        self.samples: list[tuple[int, TokenizedChat]] = []
        for index, item in enumerate(source.items):
            messages = item["messages"]
            fit = processor.fit(processor.tokenize(messages), max_length)
            fitted = counted_fit(fit, counts, split, "skipped_media_cut")
            if fitted is None:
                continue
            counts[f"{split}/samples_{modality(messages) or 'text'}"] += 1
            self.samples.append((index, fitted))
        counts[f"{split}/samples"] = len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> AVSample:
        source_index, chat = self.samples[index]
        item, media = self.source.items[source_index], self.source.media(source_index)
        try:
            check_av_media(item["messages"], media)
        except BadSampleError as error:
            where = item.get("where", f"{self.split} data")
            raise error.located(where, f"record {item.get('id', source_index)}") from None
        # a stream the text does not ask for is dropped (a world video carries its audio track even in a
        # visual-only sample), so the encoders see exactly what the placeholders take
        streams = modality(item["messages"]) or ""
        video = media.get("video") if streams in ("video", "audio-visual") else None
        audio = media.get("audio") if streams in ("audio", "audio-visual") else None
        rate = media.get("sample_rate")
        return AVSample(
            chat.input_ids, chat.labels, chat.truncated, video, audio, rate, media.get("images", [])
        )
