"""Decode images (Pillow), audio (soundfile) and video (PyAV) into the sample conventions of docs/formats.md.

Every failure raises :class:`~mmfactory.data.policy.BadSampleError` naming the media file, the problem
and a :class:`~mmfactory.data.policy.BadReason`; readers re-raise it located at the record that
referenced the file.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import av
import numpy as np
import soundfile
import torch
from PIL import Image

from mmfactory.data.policy import BadReason, BadSampleError

if TYPE_CHECKING:
    from transformers import WhisperFeatureExtractor

FrameSampling = Literal["uniform", "random"]

# libsndfile's open log marks a WAV data chunk that declares more bytes than the file holds
# ("data : 32000 (should be 15978)"); it still opens such a file and silently reads what is there.
_TRUNCATED_DATA = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_DATA_SIZE = 0xFFFFFFFF  # written by streaming encoders that cannot seek back
# Zeros appended before resampling so that libswresample's filter drains even for very short clips.
_RESAMPLER_TAIL = 1024


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BadSampleError("file not found", reason=BadReason.MISSING_FILE, file=path)
    return path


def load_image(source: str | Path | bytes, resize_to: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file (or its encoded bytes) to RGB ``uint8 [H, W, 3]``.

    The file is first checked with ``PIL.Image.verify`` (PNG chunk CRCs, truncation), then fully
    decoded and converted to RGB (alpha dropped, palette/grey expanded). ``resize_to=(height, width)``
    resizes with bicubic filtering.
    """
    file = None if isinstance(source, bytes) else _require_file(source)

    def open_image() -> Image.Image:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else file)

    try:
        with open_image() as image:
            image.verify()
        with open_image() as image:
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise BadSampleError(
            f"cannot decode image: {error}", reason=BadReason.CORRUPT_IMAGE, file=file
        ) from error
    if resize_to is not None:
        height, width = resize_to
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)


def resample_audio(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample mono ``float32 [S]`` to ``[round(S * target_sr / orig_sr)]`` with libswresample (via PyAV).

    libswresample is FFmpeg's band-limited windowed-sinc resampler (default: 32-tap filter, 1024
    phases). The input is zero-padded at the end so the filter drains, then cut to the exact length.
    """
    if orig_sr == target_sr:
        return audio.astype(np.float32, copy=False)
    num_out = round(len(audio) * target_sr / orig_sr)
    padded = np.concatenate([audio.astype(np.float32), np.zeros(_RESAMPLER_TAIL, np.float32)])
    frame = av.AudioFrame.from_ndarray(padded[None], format="flt", layout="mono")
    frame.sample_rate = orig_sr
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_sr)
    chunks = [out.to_ndarray()[0] for out in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(chunks)[:num_out]


def load_audio(
    path: str | Path, expected_sr: int | None = None, resample: bool = False
) -> tuple[np.ndarray, int]:
    """Decode an audio file to mono ``float32 [S]`` (mean over channels) and its sample rate.

    A truncated file, one with no samples, or (unless ``resample``) a sample rate other than
    ``expected_sr`` is a bad sample. With ``resample=True`` the audio is converted to ``expected_sr``
    by :func:`resample_audio`.
    """
    path = _require_file(path)
    try:
        with soundfile.SoundFile(path) as file:
            declared = _TRUNCATED_DATA.search(file.extra_info)
            data = file.read(dtype="float32", always_2d=True)
            sample_rate, num_frames = file.samplerate, file.frames
    except soundfile.SoundFileError as error:
        raise BadSampleError(
            f"cannot decode audio: {error}", reason=BadReason.CORRUPT_AUDIO, file=path
        ) from error
    declared_bytes, held_bytes = (int(declared[1]), int(declared[2])) if declared else (0, 0)
    if declared_bytes != _UNKNOWN_DATA_SIZE and held_bytes < declared_bytes:
        problem = f"truncated: data chunk declares {declared_bytes} bytes, the file holds {held_bytes}"
        raise BadSampleError(problem, reason=BadReason.CORRUPT_AUDIO, file=path)
    if len(data) < num_frames or len(data) == 0:
        problem = f"decoded {len(data)} of {num_frames} frames" if num_frames else "no audio samples"
        raise BadSampleError(problem, reason=BadReason.CORRUPT_AUDIO, file=path)
    audio = data.mean(axis=1)
    if expected_sr is not None and sample_rate != expected_sr:
        if not resample:
            problem = f"sample rate {sample_rate} Hz, expected {expected_sr} Hz (resample=True converts it)"
            raise BadSampleError(problem, reason=BadReason.WRONG_SAMPLE_RATE, file=path)
        audio, sample_rate = resample_audio(audio, sample_rate, expected_sr), expected_sr
    return audio, sample_rate


class VideoClip(NamedTuple):
    """A decoded clip. ``num_padded_frames`` trailing frames repeat the last one (the video was short)."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    audio: np.ndarray | None  # float32 [S] mono, or None (not requested / no audio stream)
    sample_rate: int | None
    num_padded_frames: int


def frame_indices(
    num_available: int, num_frames: int, sampling: FrameSampling, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Indices ``int64 [num_frames]`` into ``num_available`` decoded frames.

    The frames are cut into ``num_frames`` equal segments (TSN); ``uniform`` takes each segment's
    middle frame, ``random`` one frame drawn uniformly inside each segment. When fewer frames are
    available than requested, all are taken in order and the last is repeated to fill ``num_frames``.
    """
    if num_frames < 1 or num_available < 1:
        raise ValueError(f"need num_frames >= 1 and num_available >= 1, got {num_frames}, {num_available}")
    if num_available < num_frames:
        return np.minimum(np.arange(num_frames), num_available - 1)
    if sampling == "uniform":
        return (2 * np.arange(num_frames) + 1) * num_available // (2 * num_frames)
    if sampling == "random":
        # segment i holds frames [bounds[i], bounds[i + 1])
        bounds = np.arange(num_frames + 1) * num_available // num_frames
        return (rng or np.random.default_rng()).integers(bounds[:-1], bounds[1:])
    raise ValueError(f"sampling must be 'uniform' or 'random', got {sampling!r}")


def load_video(
    path: str | Path,
    num_frames: int,
    sampling: FrameSampling = "uniform",
    rng: np.random.Generator | None = None,
    with_audio: bool = False,
    audio_sample_rate: int | None = None,
) -> VideoClip:
    """Decode ``num_frames`` RGB frames (chosen by :func:`frame_indices`) and optionally the audio track.

    All frames of the first video stream are decoded (container frame counts are unreliable) and only
    the chosen ones are converted to RGB. With ``with_audio`` the first audio stream is decoded as
    stored (encoder priming samples are not trimmed), mixed to mono and resampled to
    ``audio_sample_rate`` (default: its own rate) by :func:`resample_audio`; a video without an audio
    stream gives ``audio=None``.
    """
    path = _require_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadSampleError("no video stream", reason=BadReason.CORRUPT_VIDEO, file=path)
            video_stream = container.streams.video[0]
            video_stream.thread_type = "AUTO"
            audio_stream = container.streams.audio[0] if with_audio and container.streams.audio else None
            to_float = av.AudioResampler(format="fltp")  # keeps layout and rate: [channels, samples]
            decoded, audio_chunks = [], []
            for packet in container.demux(*[s for s in (video_stream, audio_stream) if s is not None]):
                for frame in packet.decode():
                    if packet.stream is video_stream:
                        decoded.append(frame)
                    else:
                        audio_chunks += [out.to_ndarray().mean(axis=0) for out in to_float.resample(frame)]
            if audio_stream is not None:
                audio_chunks += [out.to_ndarray().mean(axis=0) for out in to_float.resample(None)]
            for stream, chunks in ((video_stream, decoded), (audio_stream, audio_chunks)):
                if stream is not None and not chunks:
                    problem = f"no decodable {stream.type} frames"
                    raise BadSampleError(problem, reason=BadReason.CORRUPT_VIDEO, file=path)
            indices = frame_indices(len(decoded), num_frames, sampling, rng)
            rgb = {int(i): decoded[i].to_ndarray(format="rgb24") for i in np.unique(indices)}
            frames = np.stack([rgb[int(i)] for i in indices])
    except av.FFmpegError as error:
        raise BadSampleError(
            f"cannot decode video: {error}", reason=BadReason.CORRUPT_VIDEO, file=path
        ) from error
    audio, sample_rate = None, None
    if audio_stream is not None:
        audio, sample_rate = np.concatenate(audio_chunks).astype(np.float32), audio_stream.rate
        if audio_sample_rate is not None:
            audio, sample_rate = resample_audio(audio, sample_rate, audio_sample_rate), audio_sample_rate
    return VideoClip(frames, audio, sample_rate, max(0, num_frames - len(decoded)))


def log_mel(
    extractor: WhisperFeatureExtractor, clips: list[np.ndarray], sample_rates: list[int]
) -> torch.Tensor:
    """Waveforms (mono ``[S]`` or ``[S, C]`` channels-last, any rate) -> ``input_features [A, M, L]``."""
    if not clips:
        return torch.zeros((0, extractor.feature_size, extractor.nb_max_frames))
    mono = []
    for audio, rate in zip(clips, sample_rates, strict=True):
        audio = np.asarray(audio, dtype=np.float32)
        audio = audio.mean(axis=1) if audio.ndim == 2 else audio
        mono.append(resample_audio(audio, rate, extractor.sampling_rate))
    return extractor(mono, sampling_rate=extractor.sampling_rate, return_tensors="pt").input_features
