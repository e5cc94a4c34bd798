"""``video-text`` samples: videos with one or more captions (MAC-style contrastive data).

Every ``video-text`` source (``format: world`` with ``kind: videos``, ``format: csv``) yields
:class:`~mmfactory.data.samples.Samples` with items ``{"video_id", "captions": [str, ...]}`` and
``media(i)`` the video: all its frames (uint8 ``[T, H, W, 3]``, the world) or its file (a
:class:`~pathlib.Path`, decoded by :func:`video_clip` when a sample is drawn, so a large annotation file
costs one parse and a file-existence check before step 1, not a decode per video).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from mmfactory.data.image_text import ImageCaptions
from mmfactory.data.media import FrameSampling, frame_indices, load_video
from mmfactory.data.policy import BadSampleCounter
from mmfactory.data.samples import Samples


def video_clip(
    video: np.ndarray | Path, num_frames: int, sampling: FrameSampling, rng: np.random.Generator | None
) -> np.ndarray:
    """``num_frames`` frames (chosen by :func:`~mmfactory.data.media.frame_indices`) of a video held in
    memory (uint8 ``[T, H, W, 3]``) or decoded from its file; -> uint8 ``[num_frames, H, W, 3]``."""
    if isinstance(video, np.ndarray):
        return video[frame_indices(len(video), num_frames, sampling, rng)]
    return load_video(video, num_frames, sampling, rng).frames


def _image_clip(image: Callable[[int], np.ndarray], index: int) -> np.ndarray:
    return image(index)[None]  # [1, H, W, 3]


def images_as_clips(images: ImageCaptions) -> Samples:
    """``image-text`` samples as ``video-text`` ones: each image a 1-frame clip (``video_id``
    ``image-{i}``) with all its captions, so a video-text task trains and retrieves on images too."""
    items = [{"video_id": f"image-{i}", "captions": list(c)} for i, c in enumerate(images.captions)]
    return Samples(items, partial(_image_clip, images.image))


def _record_video(records: list, index: int) -> Path:
    return records[index].fields["video"]


def read_csv_source(source, kind, bad: BadSampleCounter, counts: Counter) -> Samples:
    """MSR-VTT-style ``video_id,sentence`` CSV; videos at ``{video_root}/{video_id}.mp4`` (default root:
    ``videos/`` beside the CSV). Existence is checked here, decoding waits for :func:`video_clip`."""
    from mmfactory.data.readers import read_video_captions

    video_dir = str(Path(source.video_root).expanduser().resolve()) if source.video_root else "videos"
    records = read_video_captions(
        source.path, video_dir=video_dir, on_bad_sample=source.on_bad_sample, counter=bad, check_media=False
    ).records
    items = [{"video_id": r.fields["video_id"], "captions": r.fields["captions"]} for r in records]
    return Samples(items, partial(_record_video, records))
