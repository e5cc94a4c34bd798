"""Audio-visual formats read as ``av-chat`` samples (:mod:`mmfactory.data.av`):

* ``msrvtt_qa``: MSRVTT-QA / MSVD-QA, a JSON list (or ``.jsonl``) of ``{"video_id" or "video", "question",
  "answer", "id"?}``; visual-only samples ``<video>\\n{question}`` -> ``answer``.
* ``audiocaps``: AudioCaps CSV (header ``audiocap_id,youtube_id,start_time,caption``, one row per caption);
  audio-only samples ``<audio>\\nDescribe what you hear.`` -> ``caption``, clips resampled to 16 kHz mono.
* ``avsd``: DSTC7/8 AVSD dialogues ``{"dialogs": [{"image_id", "summary"?, "caption"?, "dialog":
  [{"question", "answer"}, ...]}]}``; one multi-turn audio-visual sample per dialog, its audio the
  video's own track (decoded from the file, 16 kHz mono).

Media lookup (:data:`VIDEO_EXTENSIONS`, :data:`AUDIO_EXTENSIONS`; the first file that exists wins):

* ``msrvtt_qa``: under ``video_root`` (default ``videos/`` beside the file), the name ``v`` (``video_id``
  or ``video``) as given, then ``v`` + each video extension, then ``video{v}`` + each video extension
  (MSRVTT's ``video7010.mp4`` for ``"video_id": 7010``);
* ``audiocaps``: under ``audio_root`` (default ``clips/`` beside the file), ``{youtube_id}_{start_time}``,
  ``{youtube_id}``, ``Y{youtube_id}`` (AudioSet downloads) and ``{audiocap_id}``, each + ``.wav`` or
  ``.flac``;
* ``avsd``: under ``video_root`` (default ``videos/`` beside the file), ``{image_id}`` + each video
  extension.

Records are validated when the file is read (fields, empty text, media files exist); bad ones go through
``on_bad_sample`` named by file and record. With ``check_media`` every sample's media are also decoded
once and checked by :func:`~mmfactory.data.av.check_av_media` (a corrupt file, a silent clip, an
audio-visual sample whose video has no audio track are bad samples then); otherwise media decode when a
sample is drawn. A video is :data:`VIDEO_FRAMES` frames at most, chosen uniformly (all of a shorter one,
none repeated); the task samples its own ``video_frames`` from those.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mmfactory.data.av import AUDIO_TOKEN, VIDEO_TOKEN, check_av_media
from mmfactory.data.media import load_audio, load_video
from mmfactory.data.policy import (
    BadReason,
    BadSampleCounter,
    BadSampleError,
    BadSamplePolicy,
    check_policy,
)
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    collect_records,
    iter_csv_rows,
    read_annotation_file,
    read_json_file,
    require,
    require_text,
)
from mmfactory.data.samples import Samples

VIDEO_FRAMES = 32  # frames kept per video at most (uniform); the task samples its video_frames from them
SAMPLE_RATE = 16000  # audio is resampled to this rate, mixed to mono
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
AUDIO_EXTENSIONS = (".wav", ".flac")
DESCRIBE_SOUND = "Describe what you hear."
AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
UNDISCLOSED = "__UNDISCLOSED__"  # the hidden answers of DSTC test files
VIDEO_PREFIX, AUDIO_PREFIX = f"{VIDEO_TOKEN}\n", f"{AUDIO_TOKEN}\n"


# --------------------------------------------------------------------------------------------------
# Media: found when read, decoded when drawn (or once when read, with check_media)
# --------------------------------------------------------------------------------------------------


def find_media(root: Path, names: Sequence[str], what: str) -> Path:
    """The first of ``root / name`` that is a file; MISSING_FILE naming the root and the names tried."""
    for name in names:
        if (root / name).is_file():
            return root / name
    tried = ", ".join(dict.fromkeys(names))
    raise BadSampleError(
        f"{what} not found under {str(root)!r} (tried {tried})", reason=BadReason.MISSING_FILE
    )


def decode_av(fields: Fields, video_frames: int = VIDEO_FRAMES) -> dict[str, Any]:
    """The media of a record: ``{"video": uint8 [T, H, W, 3] or None, "audio": float32 [S] or None,
    "sample_rate": int or None}``. ``fields["video"]`` is decoded (with its audio track when
    ``fields["video_audio"]``), else ``fields["audio"]``, both at :data:`SAMPLE_RATE` mono."""
    video, audio, rate = None, None, None
    if fields.get("video") is not None:
        with_audio = fields.get("video_audio", False)
        clip = load_video(fields["video"], video_frames, "uniform", None, with_audio, SAMPLE_RATE)
        video = clip.frames[: len(clip.frames) - clip.num_padded_frames]  # a short video: all its frames
        audio, rate = clip.audio, clip.sample_rate
    if fields.get("audio") is not None:
        audio, rate = load_audio(fields["audio"], expected_sr=SAMPLE_RATE, resample=True)
    return {"video": video, "audio": audio, "sample_rate": rate}


def check_record_media(fields: Fields) -> None:
    """Decode a record's media once (one frame) and :func:`check_av_media` them; the error names the file."""
    media = decode_av(fields, video_frames=1)
    try:
        check_av_media(fields["messages"], media)
    except BadSampleError as error:
        file = fields.get("video") if fields.get("video") is not None else fields.get("audio")
        raise BadSampleError(error.problem, reason=error.reason, file=file) from None


def record_media(dataset: RecordDataset, index: int) -> dict[str, Any]:
    """``media(index)`` of a file source: the record's media decoded, errors naming file and record."""
    return dataset[index]


def av_samples(dataset: RecordDataset, where: Path) -> Samples:
    """``av-chat`` :class:`Samples` of validated records (fields ``id``, ``messages`` and media paths)."""
    items = [
        {"id": r.fields["id"], "messages": r.fields["messages"], "where": str(where)} for r in dataset.records
    ]
    return Samples(items, partial(record_media, dataset))


def _root(configured: str | None, annotation: Path, default: str) -> Path:
    return Path(configured).expanduser().resolve() if configured else annotation.parent / default


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise BadSampleError("annotation file not found", reason=BadReason.MISSING_FILE, file=path)


def _records(
    path: Path,
    items: Iterator[tuple[str, Any]],
    parse,
    check_media: bool,
    on_bad_sample: BadSamplePolicy,
    counter: BadSampleCounter,
) -> RecordDataset:
    records = collect_records(
        path, items, parse, check_record_media if check_media else None, on_bad_sample, counter
    )
    return RecordDataset(records, decode_av, counter)


# --------------------------------------------------------------------------------------------------
# MSRVTT-QA / MSVD-QA
# --------------------------------------------------------------------------------------------------


def video_names(name: str) -> list[str]:
    """The file names tried for video ``name`` (see the module docstring)."""
    stems = [name] if name.startswith("video") else [name, f"video{name}"]
    return [name] + [f"{stem}{extension}" for stem in stems for extension in VIDEO_EXTENSIONS]


def _parse_msrvtt_qa(raw: dict[str, Any], base_dir: Path, index: dict[str, int]) -> Fields:
    key = "video_id" if "video_id" in raw else "video"
    video = require(raw, key, (str, int))
    if isinstance(video, str):
        require_text(raw, key)
    question, answer = require_text(raw, "question"), require_text(raw, "answer")
    file = find_media(base_dir, video_names(str(video)), f"video {video!r}")
    record_id = raw.get("id")
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        record_id = f"{video}-{index.get(str(video), 0)}"  # its n-th question
        index[str(video)] = index.get(str(video), 0) + 1
    return {
        "id": str(record_id),
        "messages": [
            {"role": "user", "content": VIDEO_PREFIX + question},
            {"role": "assistant", "content": answer},
        ],
        "video": file,
    }


def read_msrvtt_qa(
    path: str | Path,
    *,
    video_root: str | Path | None = None,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = False,
) -> Samples:
    """MSRVTT-QA / MSVD-QA (a JSON list; a ``.jsonl`` file line by line) -> visual-only ``av-chat``
    samples; ``id`` is the record's ``id``, else ``{video}-{n}`` (its n-th question)."""
    path = Path(path)
    root = _root(str(video_root) if video_root else None, path, "videos")
    dataset = read_annotation_file(
        path,
        partial(_parse_msrvtt_qa, index={}),
        decode_av,
        json_list=path.suffix != ".jsonl",
        on_bad_sample=on_bad_sample,
        counter=counter,
        check_media=check_media,
        check=check_record_media,
        base_dir=root,
    )
    return av_samples(dataset, path)


# --------------------------------------------------------------------------------------------------
# AudioCaps
# --------------------------------------------------------------------------------------------------


def audiocaps_names(audiocap_id: str, youtube_id: str, start_time: str) -> list[str]:
    """The file names tried for an AudioCaps clip (see the module docstring)."""
    stems = (f"{youtube_id}_{start_time}", youtube_id, f"Y{youtube_id}", audiocap_id)
    return [f"{stem}{extension}" for stem in stems for extension in AUDIO_EXTENSIONS]


def _parse_audiocaps(raw: dict[str, Any], root: Path) -> Fields:
    audiocap_id, youtube_id, start_time, caption = (require_text(raw, key) for key in AUDIOCAPS_COLUMNS)
    names = audiocaps_names(audiocap_id.strip(), youtube_id.strip(), start_time.strip())
    return {
        "id": audiocap_id.strip(),
        "messages": [
            {"role": "user", "content": AUDIO_PREFIX + DESCRIBE_SOUND},
            {"role": "assistant", "content": caption},
        ],
        "audio": find_media(root, names, f"clip of youtube_id {youtube_id!r}"),
    }


def read_audiocaps(
    path: str | Path,
    *,
    audio_root: str | Path | None = None,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = False,
) -> Samples:
    """AudioCaps CSV -> audio-only ``av-chat`` samples (id: ``audiocap_id``); clips of any rate, mono or
    stereo, are read as :data:`SAMPLE_RATE` mono."""
    check_policy(on_bad_sample)
    path, counter = Path(path), counter if counter is not None else BadSampleCounter()
    _require_file(path)
    root = _root(str(audio_root) if audio_root else None, path, "clips")
    rows = (
        (f"line {n}" + (f" (id {f['audiocap_id']!r})" if f["audiocap_id"].strip() else ""), f)
        for n, f in iter_csv_rows(path, AUDIOCAPS_COLUMNS, on_bad_sample, counter)
    )
    dataset = _records(path, rows, partial(_parse_audiocaps, root=root), check_media, on_bad_sample, counter)
    return av_samples(dataset, path)


# --------------------------------------------------------------------------------------------------
# AVSD
# --------------------------------------------------------------------------------------------------


def iter_dialogs(path: Path) -> Iterator[tuple[str, Any]]:
    """``("dialog i (id 'x')", dialog)`` for each entry of the file's ``dialogs`` list. A file that does
    not parse, or holds no ``dialogs`` list, has no records to skip: it raises under either policy."""
    content = read_json_file(path)
    dialogs = content.get("dialogs") if isinstance(content, dict) else None
    if not isinstance(dialogs, list):
        problem = 'expected a JSON object with a "dialogs" list (AVSD)'
        raise BadSampleError(problem, reason=BadReason.INVALID_RECORD, file=path)
    for index, dialog in enumerate(dialogs):
        image_id = dialog.get("image_id") if isinstance(dialog, dict) else None
        yield f"dialog {index}" + (f" (id {image_id!r})" if isinstance(image_id, str) else ""), dialog


def _parse_avsd(raw: dict[str, Any], root: Path) -> Fields:
    image_id = require_text(raw, "image_id")
    turns = require(raw, "dialog", list)
    if not turns:
        raise BadSampleError("'dialog' is empty", reason=BadReason.INVALID_RECORD)
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSampleError(f"dialog[{position}] must be an object", reason=BadReason.INVALID_RECORD)
        try:
            question, answer = require_text(turn, "question"), require_text(turn, "answer")
        except BadSampleError as error:
            raise BadSampleError(f"dialog[{position}]: {error.problem}", reason=error.reason) from None
        if answer.strip() == UNDISCLOSED:
            problem = f"dialog[{position}]: the answer is {UNDISCLOSED} (a DSTC test file hides it)"
            raise BadSampleError(problem, reason=BadReason.INVALID_RECORD)
        prefix = VIDEO_PREFIX + AUDIO_PREFIX if position == 0 else ""
        messages += [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
    names = [f"{image_id}{extension}" for extension in VIDEO_EXTENSIONS]
    return {
        "id": image_id,
        "messages": messages,
        "video": find_media(root, names, f"video {image_id!r}"),
        "video_audio": True,
    }


def read_avsd(
    path: str | Path,
    *,
    video_root: str | Path | None = None,
    on_bad_sample: BadSamplePolicy = "error",
    counter: BadSampleCounter | None = None,
    check_media: bool = False,
) -> Samples:
    """AVSD dialogues -> one audio-visual ``av-chat`` sample per dialog (id: ``image_id``); ``summary``
    and ``caption`` are not part of the conversation."""
    check_policy(on_bad_sample)
    path, counter = Path(path), counter if counter is not None else BadSampleCounter()
    _require_file(path)
    root = _root(str(video_root) if video_root else None, path, "videos")
    dataset = _records(
        path, iter_dialogs(path), partial(_parse_avsd, root=root), check_media, on_bad_sample, counter
    )
    return av_samples(dataset, path)


# --------------------------------------------------------------------------------------------------
# Source readers (FORMATS in mmfactory.data.sources)
# --------------------------------------------------------------------------------------------------


def _read_source(
    read: Callable, root_key: str, source, kind, bad: BadSampleCounter, counts: Counter
) -> Samples:
    root = {root_key: getattr(source, root_key)}
    return read(
        source.path, **root, on_bad_sample=source.on_bad_sample, counter=bad, check_media=source.check_media
    )


read_msrvtt_qa_source = partial(_read_source, read_msrvtt_qa, "video_root")
read_audiocaps_source = partial(_read_source, read_audiocaps, "audio_root")
read_avsd_source = partial(_read_source, read_avsd, "video_root")
