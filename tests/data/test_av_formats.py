"""The audio-visual file formats read as ``av-chat`` samples (MSRVTT-QA / MSVD-QA, AudioCaps, AVSD): real
files give the right conversations and media, ``world export`` reads back as the world's own samples, and
bad records or media are errors naming file and record, or skips counted by reason."""

import pickle
import re
from collections import Counter
from dataclasses import dataclass

import av
import numpy as np
import pytest

from mmfactory.config import ConfigError, from_dict
from mmfactory.data.av import check_av_media
from mmfactory.data.policy import BadReason, BadSampleError
from mmfactory.data.readers.av_formats import VIDEO_FRAMES
from mmfactory.data.source_config import SourceConfig
from mmfactory.data.sources import check_kinds, check_source_paths, read_sources

PCM16_STEP = 1 / 32767 + 1e-6
CAPS_HEADER = "audiocap_id,youtube_id,start_time,caption\n"


def read(**raw):
    counts = Counter()
    source = from_dict(SourceConfig, raw, "source")
    return read_sources([source], "av-chat", counts, "train", report=False), counts


def avi(files, relative: str, frames: np.ndarray):
    """An MPEG-4 Part 2 AVI (MSVD's container), no audio."""
    path = files.root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        stream.options = {"qscale": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def user_assistant(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# --------------------------------------------------------------------------------------------------
# MSRVTT-QA / MSVD-QA
# --------------------------------------------------------------------------------------------------


def test_msrvtt_and_msvd_qa_find_their_videos_and_give_visual_only_samples(files):
    six, long = files.solid_frames(6), files.solid_frames(40, 16, 16)
    files.mp4("qa/videos/video7010.mp4", six, files.sine(0.5))  # MSRVTT: integer video_id
    files.mp4("qa/videos/long.mp4", long)
    avi(files, "qa/videos/-4wsuPCjDBc_5_15.avi", six)  # MSVD: the video's name
    records = [
        {"answer": "red", "id": 0, "question": "what is red?", "video_id": 7010},
        {"answer": "a man", "id": 1, "question": "who sings?", "video": "-4wsuPCjDBc_5_15"},
        {"answer": "two", "question": "how many?", "video_id": "long"},  # no id: {video}-{n}
        {"answer": "x", "id": 3, "question": "lost?", "video_id": 7011},  # index 3: no such file
        {"answer": "x", "id": 4, "question": " ", "video_id": 7010},
        {"answer": "x", "id": 5, "video_id": 7010},
        "not an object",
    ]
    path = files.json("qa/train_qa.json", records)
    with pytest.raises(BadSampleError) as info:
        read(format="msrvtt_qa", path=str(path))
    assert info.value.reason is BadReason.MISSING_FILE
    assert str(info.value).startswith(f"{path}, index 3 (id 3): video 7011 not found under ")
    assert "7011.mp4" in str(info.value) and "video7011.mp4" in str(info.value)

    samples, counts = read(format="msrvtt_qa", path=str(path), on_bad_sample="skip")
    assert counts == {
        "train/bad_missing_file": 1,
        "train/bad_empty_text": 1,
        "train/bad_invalid_record": 2,
    }
    assert [item["id"] for item in samples.items] == ["0", "1", "long-0"]
    assert samples.items[0]["messages"] == user_assistant("<video>\nwhat is red?", "red")
    assert samples.items[1]["messages"] == user_assistant("<video>\nwho sings?", "a man")
    assert {item["where"] for item in samples.items} == {str(path)}
    first, msvd, capped = (samples.media(i) for i in range(3))
    assert first["audio"] is None and first["sample_rate"] is None  # visual-only: the track is not read
    assert first["video"].dtype == np.uint8 and first["video"].shape == (6, 32, 48, 3)
    assert np.abs(first["video"].astype(int) - six).max() <= 4
    assert msvd["video"].shape == (6, 32, 48, 3) and np.abs(msvd["video"].astype(int) - six).max() <= 12
    assert capped["video"].shape == (VIDEO_FRAMES, 16, 16, 3)  # 40 frames: 32 of them, uniformly
    picked = (2 * np.arange(VIDEO_FRAMES) + 1) * 40 // (2 * VIDEO_FRAMES)
    assert np.abs(capped["video"].astype(int) - long[picked]).max() <= 4

    jsonl = files.jsonl("qa/train_qa.jsonl", records[:3])  # a .jsonl file is read line by line
    by_line, _ = read(format="msrvtt_qa", path=str(jsonl))
    assert [i["messages"] for i in by_line.items] == [i["messages"] for i in samples.items]

    files.text("qa/broken.json", '[{"answer": "red", ')
    with pytest.raises(BadSampleError, match="broken.json: malformed JSON"):
        read(format="msrvtt_qa", path=str(files.root / "qa/broken.json"), on_bad_sample="skip")


def test_video_root_limit_and_a_picklable_media_function(files):
    files.mp4("elsewhere/a.mp4", files.solid_frames(3))
    rows = [{"answer": f"a{i}", "id": i, "question": f"q{i}?", "video": "a.mp4"} for i in range(3)]
    path = files.json("ann/val.json", rows)
    samples, _ = read(format="msrvtt_qa", path=str(path), video_root=str(files.root / "elsewhere"), limit=2)
    assert [i["messages"][1]["content"] for i in samples.items] == ["a0", "a1"]
    media = pickle.loads(pickle.dumps(samples.media))  # DataLoader workers
    assert media(1)["video"].shape == (3, 32, 48, 3)
    with pytest.raises(BadSampleError, match="not found under"):  # the default root: videos/ beside it
        read(format="msrvtt_qa", path=str(path))


# --------------------------------------------------------------------------------------------------
# AudioCaps
# --------------------------------------------------------------------------------------------------


def test_audiocaps_rows_find_their_clips_and_bad_rows_are_named_or_counted(files):
    tone = files.sine(0.25)
    files.wav("caps/clips/abc_30.wav", tone)  # {youtube_id}_{start_time}
    files.wav("caps/clips/def.wav", tone)  # {youtube_id}
    files.wav("caps/clips/Yghi.wav", tone)  # Y{youtube_id}, AudioSet's downloads
    files.wav("caps/clips/104.wav", tone)  # {audiocap_id}
    path = files.text(
        "caps/train.csv",
        CAPS_HEADER
        + "101,abc,30,A dog barks\n"  # line 2
        + '102,def,0,"Wind blows, a door slams"\n'  # line 3
        + "103,ghi,10,Rain falls\n"  # line 4
        + "104,jkl,0,Birds sing\n"  # line 5
        + "105,zzz,0,No clip here\n"  # line 6
        + "106,abc,30,too,many\n"  # line 7
        + "107,abc,30,\n"  # line 8
        + '108,abc,30,"unclosed\n',  # line 9
    )
    with pytest.raises(BadSampleError) as info:
        read(format="audiocaps", path=str(path))
    assert info.value.reason is BadReason.MISSING_FILE
    assert str(info.value).startswith(f"{path}, line 6 (id '105'): clip of youtube_id 'zzz' not found under")

    samples, counts = read(format="audiocaps", path=str(path), on_bad_sample="skip")
    assert counts == {"train/bad_missing_file": 1, "train/bad_malformed_csv": 2, "train/bad_empty_text": 1}
    assert [i["id"] for i in samples.items] == ["101", "102", "103", "104"]
    describe = "<audio>\nDescribe what you hear."
    assert samples.items[1]["messages"] == user_assistant(describe, "Wind blows, a door slams")
    media = samples.media(0)
    assert media["video"] is None and media["sample_rate"] == 16000 and media["audio"].dtype == np.float32
    np.testing.assert_allclose(media["audio"], tone, atol=PCM16_STEP)

    files.text("caps/bad_header.csv", "youtube_id,caption\nabc,A dog\n")
    with pytest.raises(BadSampleError, match="line 1: header must name columns"):
        read(format="audiocaps", path=str(files.root / "caps/bad_header.csv"), on_bad_sample="skip")


def test_a_44khz_stereo_clip_is_read_as_16khz_mono(files):
    left = files.sine(0.5, sample_rate=44100)
    files.wav("clips/st_0.wav", np.stack([left, 0.5 * left], axis=1), sample_rate=44100)
    path = files.text("caps.csv", CAPS_HEADER + "1,st,0,A tone\n")
    samples, _ = read(format="audiocaps", path=str(path), check_media=True)
    media = samples.media(0)
    assert media["sample_rate"] == 16000 and media["audio"].shape == (8000,)  # mono, 0.5 s at 16 kHz
    want = 0.75 * files.sine(0.5)  # the mean of the channels, at the new rate
    np.testing.assert_allclose(media["audio"][200:-200], want[200:-200], atol=0.01)


# --------------------------------------------------------------------------------------------------
# AVSD
# --------------------------------------------------------------------------------------------------


def avsd_dialog(image_id: str, turns: list[tuple[str, str]]) -> dict:
    return {
        "image_id": image_id,
        "summary": "a summary",
        "caption": "a caption",
        "dialog": [{"question": q, "answer": a} for q, a in turns],
    }


def test_avsd_dialogs_are_multi_turn_audio_visual_samples(files):
    frames, sound = files.solid_frames(5), files.sine(0.5)
    files.mp4("avsd/videos/QRTQT.mp4", frames, sound)
    dialogs = [
        avsd_dialog("QRTQT", [("what is he doing?", "he sits"), ("is there music?", "no, a voice")]),
        avsd_dialog("MISSING", [("q?", "a")]),
        avsd_dialog("QRTQT", [("q?", "__UNDISCLOSED__")]),  # a DSTC test file's hidden answer
        {"image_id": "QRTQT", "dialog": [{"question": "q?"}]},
        {"image_id": "QRTQT", "dialog": []},
    ]
    path = files.json("avsd/train.json", {"dialogs": dialogs})
    with pytest.raises(BadSampleError) as info:
        read(format="avsd", path=str(path))
    assert info.value.reason is BadReason.MISSING_FILE
    assert str(info.value).startswith(f"{path}, dialog 1 (id 'MISSING'): video 'MISSING' not found under")

    samples, counts = read(format="avsd", path=str(path), on_bad_sample="skip")
    assert counts == {"train/bad_missing_file": 1, "train/bad_invalid_record": 3}
    assert samples.items == [
        {
            "id": "QRTQT",
            "messages": [
                *user_assistant("<video>\n<audio>\nwhat is he doing?", "he sits"),
                *user_assistant("is there music?", "no, a voice"),
            ],
            "where": str(path),
        }
    ]
    media = samples.media(0)
    assert media["video"].shape == (5, 32, 48, 3) and np.abs(media["video"].astype(int) - frames).max() <= 4
    assert media["sample_rate"] == 16000 and media["audio"].ndim == 1 and media["audio"].dtype == np.float32
    assert len(media["audio"]) >= len(sound)  # AAC adds priming samples
    check_av_media(samples.items[0]["messages"], media)  # both streams, not silent

    files.json("avsd/list.json", dialogs)
    with pytest.raises(BadSampleError, match='list.json: expected a JSON object with a "dialogs" list'):
        read(format="avsd", path=str(files.root / "avsd/list.json"), on_bad_sample="skip")


# --------------------------------------------------------------------------------------------------
# Bad media: checked when read with check_media, else when drawn
# --------------------------------------------------------------------------------------------------


def _corrupt_wav(files):
    whole = files.wav("whole.wav", files.sine(0.25))
    files.wav("caps/clips/good.wav", files.sine(0.25))
    return files.truncated("caps/clips/bad.wav", whole), "corrupt_audio"


def _silent_wav(files):
    files.wav("caps/clips/good.wav", files.sine(0.25))
    return files.wav("caps/clips/bad.wav", np.zeros(4000, np.float32)), "silent_audio"


def _mute_mp4(files):
    files.mp4("caps/videos/good.mp4", files.solid_frames(3), files.sine(0.25))
    return files.mp4("caps/videos/bad.mp4", files.solid_frames(3)), "missing_audio"


def _annotation(files, fmt: str):
    if fmt == "audiocaps":
        return files.text(
            "caps/train.csv", CAPS_HEADER + "1,good,0,A tone\n2,bad,0,A bad tone\n"
        ), "line 3 (id '2')"
    dialogs = [avsd_dialog("good", [("what?", "a tone")]), avsd_dialog("bad", [("what?", "a bad tone")])]
    return files.json("caps/train.json", {"dialogs": dialogs}), "dialog 1 (id 'bad')"


@pytest.mark.parametrize(
    ("fmt", "make", "problem"),
    [
        ("audiocaps", _corrupt_wav, "truncated: data chunk declares"),
        ("audiocaps", _silent_wav, "the audio track is silent"),
        ("avsd", _mute_mp4, "an <audio> placeholder but no audio track"),
    ],
    ids=["corrupt_wav", "silent_wav", "mp4_without_audio"],
)
def test_bad_media_are_errors_naming_file_and_record_or_counted_skips(files, fmt, make, problem):
    bad, reason = make(files)
    path, record = _annotation(files, fmt)
    with pytest.raises(BadSampleError) as info:
        read(format=fmt, path=str(path), check_media=True)
    assert info.value.reason is BadReason(reason)
    assert str(info.value).startswith(f"{path}, {record}: {bad}: {problem}")

    samples, counts = read(format=fmt, path=str(path), check_media=True, on_bad_sample="skip")
    assert counts == {f"train/bad_{reason}": 1}
    assert [i["id"] for i in samples.items] == ["1" if fmt == "audiocaps" else "good"]

    lazy, counts = read(format=fmt, path=str(path))  # without check_media: found, decoded when drawn
    assert len(lazy) == 2 and counts == {}
    if reason == "corrupt_audio":
        with pytest.raises(BadSampleError, match=re.escape(f"{path}, {record}: {bad}: truncated")):
            lazy.media(1)
    else:  # it decodes; the task's check_av_media refuses it when drawn
        with pytest.raises(BadSampleError) as info:
            check_av_media(lazy.items[1]["messages"], lazy.media(1))
        assert info.value.reason is BadReason(reason)
    check_av_media(lazy.items[0]["messages"], lazy.media(0))


# --------------------------------------------------------------------------------------------------
# world export -> the readers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from mmfactory.world.export import EXPORT_SIZES, export_world

    tiny = {"image": 1, "image_eval": 1, "video": 3, "video_eval": 2, "text": 1, "text_eval": 1, "pool": 2}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(EXPORT_SIZES, "tiny", tiny)
        root = tmp_path_factory.mktemp("world")
        counts = export_world(root, size="tiny", seed=0)
    return root, counts


@pytest.mark.parametrize(
    ("fmt", "file", "kind"),
    [
        ("msrvtt_qa", "video/msrvtt_qa_{split}.json", "video_qa"),
        ("audiocaps", "audio/audiocaps_{split}.csv", "audio_captions"),
        ("avsd", "video/avsd_{split}.json", "av_conversations"),
    ],
)
@pytest.mark.parametrize("split", ["train", "val"])
def test_world_export_reads_back_as_the_worlds_own_samples(exported, fmt, file, kind, split):
    root, counts = exported
    relative = file.format(split=split)
    got, bad = read(format=fmt, path=str(root / relative), check_media=True)
    want, _ = read(format="world", kind=kind, split=split, size=counts[relative])
    assert bad == {} and len(got) == counts[relative] == (3 if split == "train" else 2)
    assert [i["messages"] for i in got.items] == [i["messages"] for i in want.items]
    for index in range(len(got)):
        read_media, made = got.media(index), want.media(index)
        if made["video"] is None:
            assert read_media["video"] is None
        else:
            np.testing.assert_array_equal(read_media["video"], made["video"])  # lossless RGB H.264
        if kind == "video_qa":  # visual-only: the track is not read
            assert read_media["audio"] is None
            continue
        assert read_media["sample_rate"] == made["sample_rate"] == 16000
        assert read_media["audio"].shape == made["audio"].shape
        assert np.abs(read_media["audio"] - made["audio"]).max() <= PCM16_STEP


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"format": "audiocaps", "path": "x", "video_root": "v"},
            "video_root: not read by format 'audiocaps'",
        ),
        (
            {"format": "msrvtt_qa", "path": "x", "audio_root": "a"},
            "audio_root: not read by format 'msrvtt_qa'",
        ),
        ({"format": "avsd"}, "path: format 'avsd' needs a path"),
    ],
)
def test_settings_an_av_format_does_not_read_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(SourceConfig, raw, "source")


def test_a_missing_audio_root_and_a_task_of_another_kind_are_refused(files):
    @dataclass
    class Data:
        train: list

    path = files.text("caps.csv", CAPS_HEADER)
    source = SourceConfig(format="audiocaps", path=str(path), audio_root=str(files.root / "nowhere"))
    with pytest.raises(ConfigError, match=r"data.train\[0\].audio_root: .*nowhere' does not exist"):
        check_source_paths(Data([source]), "data")
    with pytest.raises(
        ConfigError, match="format 'audiocaps' yields av-chat samples, this task reads 'chat'"
    ):
        check_kinds([source], "chat", "data.train")
