"""Write the world to disk in the layout of ``docs/formats.md``, byte-identically for the same seed.

Media: PNG (Pillow), WAV PCM16 mono (soundfile), MP4 with lossless H.264 in RGB (``libx264rgb``, qp 0)
plus a lossless ALAC audio track (PyAV). Decoding an MP4 to ``rgb24`` returns the rendered frames
exactly and its audio equals the PCM16-quantised track (error <= 1/32767 + float rounding, like the
WAVs). Webdataset shards are plain tars with sorted members, mtime 0 and no owner names. The audio-visual
public formats (MSRVTT-QA, AudioCaps, AVSD) are annotation files over the same videos and clips.
"""

import csv
import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

from mmfactory.world import World
from mmfactory.world.rng import IMAGE_SPLITS, SPLITS, item_rng
from mmfactory.world.video import av_instruction, clip_at
from mmfactory.world.vqa import POPE_KINDS

# items per split: images (llava, pairs, vqa, pope, rankings, preference), videos, audio clips, texts
EXPORT_SIZES: dict[str, dict[str, int]] = {
    "small": {
        "image": 64,
        "image_eval": 16,
        "video": 16,
        "video_eval": 8,
        "text": 64,
        "text_eval": 16,
        "pool": 128,
    },
    "medium": {
        "image": 2000,
        "image_eval": 200,
        "video": 500,
        "video_eval": 100,
        "text": 2000,
        "text_eval": 200,
        "pool": 5000,
    },
}
SHARD_SIZE = 1000
POOL_BAD_FRACTION = 0.5


def _count(sizes: dict[str, int], kind: str, split: str) -> int:
    return sizes[kind] if split == "train" else sizes[f"{kind}_eval"]


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def _write_json(path: Path, records: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return len(records)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, audio, sample_rate, subtype="PCM_16", format="WAV")


def write_mp4(path: Path, video: np.ndarray, audio: np.ndarray, sample_rate: int, fps: float) -> None:
    """``video`` uint8 [T, H, W, 3] as lossless RGB H.264 plus ``audio`` float32 [S] as 16-bit ALAC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        vstream = container.add_stream("libx264rgb", rate=round(fps), options={"qp": "0", "threads": "1"})
        vstream.width, vstream.height, vstream.pix_fmt = video.shape[2], video.shape[1], "rgb24"
        astream = container.add_stream("alac", rate=sample_rate, layout="mono")
        astream.codec_context.format = "s16p"
        for frame in video:
            container.mux(vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(vstream.encode())
        pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)[None]
        aframe = av.AudioFrame.from_ndarray(pcm, format="s16p", layout="mono")
        aframe.sample_rate, aframe.pts = sample_rate, 0
        container.mux(astream.encode(aframe))
        container.mux(astream.encode())


def _write_shards(directory: Path, split: str, samples: list[tuple[str, np.ndarray, str]]) -> int:
    """Webdataset tars ``{split}-000000.tar``, ...; members ``{key}.json`` ({"id"}), ``.png``, ``.txt``."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, max(len(samples), 1), SHARD_SIZE)):
        with tarfile.open(directory / f"{split}-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, image, text in samples[start : start + SHARD_SIZE]:
                members = {
                    "json": json.dumps({"id": key}).encode(),
                    "png": _png_bytes(image),
                    "txt": text.encode(),
                }
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
    return len(samples)


def _export_images(world: World, root: Path, sizes: dict[str, int], counts: dict[str, int]) -> None:
    for split in IMAGE_SPLITS:
        n = _count(sizes, "image", split)
        llava = world.llava(split, n)
        for item in llava:
            _write_png(root / "llava" / "images" / f"{item['id']}.png", item["images"][0])
            _write_png(root / "pairs" / "images" / f"{item['id']}.png", item["images"][0])
        image = {item["id"]: f"../llava/images/{item['id']}.png" for item in llava}
        counts[f"llava/{split}.json"] = _write_json(
            root / "llava" / f"{split}.json",
            [
                {
                    "id": x["id"],
                    "image": f"images/{x['id']}.png",
                    "conversations": [
                        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                        for m in x["conversations"]
                    ],
                }
                for x in llava
            ],
        )
        pairs = world.pairs(split, n)
        counts[f"pairs/{split}.jsonl"] = _write_jsonl(
            root / "pairs" / f"{split}.jsonl",
            ({"id": x["id"], "image": f"images/{x['id']}.png", "text": x["text"]} for x in pairs),
        )
        counts[f"pairs/shards/{split}"] = _write_shards(
            root / "pairs" / "shards", split, [(x["id"], x["image"], x["text"]) for x in pairs]
        )
        counts[f"vqa/{split}.jsonl"] = _write_jsonl(
            root / "vqa" / f"{split}.jsonl",
            (
                {"id": x["id"], "image": image[x["id"]], **{k: x[k] for k in ("question", "answer", "type")}}
                for x in world.vqa(split, n)
            ),
        )
        for kind in POPE_KINDS:
            counts[f"pope/{split}_{kind}.jsonl"] = _write_jsonl(
                root / "pope" / f"{split}_{kind}.jsonl",
                (
                    {
                        "id": x["id"],
                        "image": image[x["id"]],
                        **{k: x[k] for k in ("question", "label", "object")},
                    }
                    for x in world.pope(split, n, kind)
                ),
            )
        if split in SPLITS:
            counts[f"ranking/{split}.jsonl"] = _write_jsonl(
                root / "ranking" / f"{split}.jsonl",
                (
                    {"id": x["id"], "image": image[x["id"]], "captions": x["captions"], "ranks": x["ranks"]}
                    for x in world.rankings(split, n)
                ),
            )
            counts[f"preference/{split}.jsonl"] = _write_jsonl(
                root / "preference" / f"{split}.jsonl",
                (
                    {**{k: x[k] for k in ("id", "prompt", "chosen", "rejected")}, "image": image[x["id"]]}
                    for x in world.preference(split, n)
                ),
            )
    pool, truth = world.web_pool(sizes["pool"], POOL_BAD_FRACTION)
    for x in pool:
        _write_png(root / "pool" / "images" / f"{x['uid']}.png", x["image"])
    counts["pool/pool.jsonl"] = _write_jsonl(
        root / "pool" / "pool.jsonl",
        ({"uid": x["uid"], "image": f"images/{x['uid']}.png", "text": x["text"]} for x in pool),
    )
    counts["pool/truth.jsonl"] = _write_jsonl(root / "pool" / "truth.jsonl", truth)


def _export_video_audio(world: World, root: Path, sizes: dict[str, int], counts: dict[str, int]) -> None:
    for split in SPLITS:
        n = _count(sizes, "video", split)
        videos = world.video_qa(split, n)
        for v in videos:
            write_mp4(
                root / "video" / "videos" / f"{v['video_id']}.mp4",
                v["video"],
                v["audio"],
                v["sample_rate"],
                world.fps,
            )
        csv_path = root / "video" / f"{split}.csv"
        with csv_path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["video_id", "sentence"])
            writer.writerows([v["video_id"], sentence] for v in videos for sentence in v["captions"])
        counts[f"video/{split}.csv"] = sum(len(v["captions"]) for v in videos)
        qa_fields = ("question", "answer", "type")
        counts[f"video/qa_{split}.jsonl"] = _write_jsonl(
            root / "video" / f"qa_{split}.jsonl",
            ({"video_id": v["video_id"], **{k: v[k] for k in qa_fields}} for v in videos),
        )
        counts[f"video/avqa_{split}.jsonl"] = _write_jsonl(
            root / "video" / f"avqa_{split}.jsonl",
            ({"video_id": v["video_id"], **{k: v[k] for k in qa_fields}} for v in world.av_qa(split, n)),
        )
        clips = world.audio_qa(split, n)
        for c in clips:
            write_wav(root / "audio" / "clips" / f"{c['id']}.wav", c["audio"], c["sample_rate"])
        counts[f"audio/{split}.json"] = _write_json(
            root / "audio" / f"{split}.json",
            [{"id": c["id"], "audio": f"clips/{c['id']}.wav", "caption": c["caption"]} for c in clips],
        )
        counts[f"audio/qa_{split}.jsonl"] = _write_jsonl(
            root / "audio" / f"qa_{split}.jsonl",
            ({"id": c["id"], **{k: c[k] for k in qa_fields}} for c in clips),
        )
        _export_av_formats(world, root, split, videos, clips, counts)


def _export_av_formats(
    world: World, root: Path, split: str, videos: list[dict], clips: list[dict], counts: dict[str, int]
) -> None:
    """The same videos and clips in three public audio-visual formats (no new media files):
    MSRVTT-QA ``video/msrvtt_qa_{split}.json`` (the visual-only video QA), AudioCaps
    ``audio/audiocaps_{split}.csv`` (each clip is ``clips/{youtube_id}.wav``, start time 0) and AVSD
    ``video/avsd_{split}.json`` (a multi-turn conversation about each video's frames and sound, the
    world's ``av_conversations``; its audio is the mp4's own track)."""
    counts[f"video/msrvtt_qa_{split}.json"] = _write_json(
        root / "video" / f"msrvtt_qa_{split}.json",
        [
            {"answer": v["answer"], "id": i, "question": v["question"], "video_id": v["video_id"]}
            for i, v in enumerate(videos)
        ],
    )
    csv_path = root / "audio" / f"audiocaps_{split}.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        writer.writerows([i, c["id"], 0, c["caption"]] for i, c in enumerate(clips))
    counts[f"audio/audiocaps_{split}.csv"] = len(clips)
    dialogs = []
    for i, v in enumerate(videos):
        clip = clip_at(world.seed, split, i, world.video_frames, world.max_video_objects)
        turns = av_instruction(
            clip, world.fps, item_rng(world.seed, "av-instruct", "conversation", split, i), "conversation"
        )
        narrative = av_instruction(
            clip, world.fps, item_rng(world.seed, "av-instruct", "narrative", split, i), "narrative"
        )
        dialogs.append(
            {
                "image_id": v["video_id"],
                "summary": narrative[0][1],
                "caption": v["captions"][0],
                "dialog": [{"question": q, "answer": a} for q, a in turns],
            }
        )
    path = root / "video" / f"avsd_{split}.json"
    path.write_text(json.dumps({"dialogs": dialogs}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    counts[f"video/avsd_{split}.json"] = len(dialogs)


def _export_text(world: World, root: Path, sizes: dict[str, int], counts: dict[str, int]) -> None:
    for split in SPLITS:
        n = _count(sizes, "text", split)
        articles = [
            a
            for pair in zip(world.articles(split, n, "en"), world.articles(split, n, "zh"), strict=True)
            for a in pair
        ]
        counts[f"articles/{split}.jsonl"] = _write_jsonl(
            root / "articles" / f"{split}.jsonl",
            ({k: a[k] for k in ("id", "lang", "facts", "draft", "reference")} for a in articles),
        )
        counts[f"chat/{split}.jsonl"] = _write_jsonl(
            root / "chat" / f"{split}.jsonl",
            ({"id": c["id"], "messages": c["messages"]} for c in world.chat(split, n)),
        )


def export_world(out_dir: str | Path, size: str = "small", seed: int = 0) -> dict[str, int]:
    """Write every part of the world under ``out_dir``; returns ``{file: number of records}``.

    ``small`` takes a few seconds (tests, demos); ``medium`` is enough to see the tiny recipes learn.
    """
    if size not in EXPORT_SIZES:
        raise ValueError(f"unknown export size {size!r}; expected one of {tuple(EXPORT_SIZES)}")
    root, world, sizes = Path(out_dir), World(seed=seed), EXPORT_SIZES[size]
    counts: dict[str, int] = {}
    _export_images(world, root, sizes, counts)
    _export_video_audio(world, root, sizes, counts)
    _export_text(world, root, sizes, counts)
    return counts
