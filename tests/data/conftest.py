"""Small real media and annotation files written into ``tmp_path`` for the data tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from mmfactory.data.policy import BadSampleError

SAMPLE_RATE = 16000


class DataFiles:
    """Writes fixture files under ``root``: each writer takes a relative path and returns the full one."""

    sample_rate = SAMPLE_RATE

    def __init__(self, root: Path):
        self.root = root

    @staticmethod
    def solid_frames(num_frames: int, height: int = 32, width: int = 48) -> np.ndarray:
        """uint8 [T, H, W, 3]: frame t is one flat colour, distinct from every other frame's."""
        t = np.arange(num_frames)
        colours = np.stack([30 + 20 * t, 220 - 15 * t, np.full(num_frames, 90)], axis=1)
        return np.broadcast_to(colours[:, None, None, :], (num_frames, height, width, 3)).astype(np.uint8)

    @staticmethod
    def sine(seconds: float, sample_rate: int = SAMPLE_RATE, hz: float = 440.0) -> np.ndarray:
        """float32 [seconds * sample_rate], amplitude 0.5."""
        t = np.arange(round(seconds * sample_rate)) / sample_rate
        return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)

    def _path(self, relative: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def png(self, relative: str, seed: int = 0, size: tuple[int, int] = (12, 16)) -> Path:
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path := self._path(relative))
        return path

    def truncated(self, relative: str, source: Path, keep: float | int = 0.5) -> Path:
        """The first ``keep`` bytes of ``source`` (a float: that fraction of them)."""
        data = source.read_bytes()
        (path := self._path(relative)).write_bytes(
            data[: keep if isinstance(keep, int) else int(len(data) * keep)]
        )
        return path

    def random_bytes(self, relative: str, size: int = 4096) -> Path:
        (path := self._path(relative)).write_bytes(np.random.default_rng(0).bytes(size))
        return path

    def wav(self, relative: str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
        soundfile.write(path := self._path(relative), audio, sample_rate, subtype="PCM_16")
        return path

    def mp4(self, relative: str, frames: np.ndarray, audio: np.ndarray | None = None, fps: int = 10) -> Path:
        """H.264 (crf 0) video and, if given, a mono AAC track at SAMPLE_RATE."""
        with av.open(str(path := self._path(relative)), "w") as container:
            video = container.add_stream("libx264", rate=fps, options={"crf": "0"})
            video.height, video.width, video.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
            packets = [
                p for frame in frames for p in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
            ]
            packets += video.encode()
            if audio is not None:
                stream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
                frame = av.AudioFrame.from_ndarray(audio[None], format="flt", layout="mono")
                frame.sample_rate = SAMPLE_RATE
                packets += stream.encode(frame) + stream.encode()
            container.mux(packets)
        return path

    def text(self, relative: str, content: str) -> Path:
        (path := self._path(relative)).write_text(content, encoding="utf-8")
        return path

    def jsonl(self, relative: str, records: list[dict | str]) -> Path:
        """One line per record; a str record is written as is (e.g. a malformed line)."""
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
        return self.text(relative, "\n".join(lines) + "\n")

    def json(self, relative: str, content: object) -> Path:
        return self.text(relative, json.dumps(content, ensure_ascii=False))

    def tar(self, relative: str, members: list[tuple[str, bytes]]) -> Path:
        with tarfile.open(path := self._path(relative), "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path


@pytest.fixture
def files(tmp_path: Path) -> DataFiles:
    return DataFiles(tmp_path)


@pytest.fixture
def bad_sample():
    """``bad_sample(function, *args, **kwargs)``: the BadSampleError that the call raises."""

    def run(function, *args, **kwargs) -> BadSampleError:
        with pytest.raises(BadSampleError) as info:
            function(*args, **kwargs)
        return info.value

    return run
