"""Readers of audio and video formats: MSR-VTT-style CSV + mp4, AudioCaps-style JSON + wav."""

import numpy as np
import torch

from mmfactory.data.policy import BadReason
from mmfactory.data.readers import read_audio_captions, read_audio_qa, read_video_captions, read_video_qa


def _write_videos(files):
    files.mp4("video/videos/v1.mp4", files.solid_frames(6), files.sine(0.5))
    files.mp4("video/videos/v4.mp4", files.solid_frames(2))
    files.random_bytes("video/videos/v2.mp4")
    return files.text(
        "video/train.csv",
        "video_id,sentence\n"
        "v1,a red square moves left\n"  # line 2
        'v1,"a square, moving"\n'  # line 3
        "v2,a broken video\n"  # line 4
        "v3,a missing video\n"  # line 5
        "v1,too,many,fields\n"  # line 6
        "v1,\n"  # line 7
        'v1,"unbalanced"quote\n'  # line 8
        "v4,a short clip\n",  # line 9
    )


def test_video_captions_errors_name_file_record_and_problem(files, bad_sample):
    path = _write_videos(files)
    error = bad_sample(read_video_captions, path)
    assert error.reason is BadReason.MALFORMED_CSV
    assert str(error) == f"{path}, line 6: 4 fields where the header has 2"
    valid_rows = "".join(path.read_text().splitlines(keepends=True)[:5])
    path.write_text(valid_rows)
    error = bad_sample(read_video_captions, path)
    assert error.reason is BadReason.CORRUPT_VIDEO
    videos = files.root / "video/videos"
    assert str(error).startswith(f"{path}, line 4 (id 'v2'): {videos}/v2.mp4: cannot decode video: ")


def test_video_captions_skip_groups_captions_and_counts_bad(files):
    path = _write_videos(files)
    dataset = read_video_captions(path, num_frames=4, with_audio=True, on_bad_sample="skip")
    assert dataset.counter.summary() == {
        "corrupt_video": 1,
        "empty_text": 1,
        "malformed_csv": 2,
        "missing_file": 1,
    }
    assert dataset.counter.examples["missing_file"] == [f"{path}, line 5 (id 'v3')"]
    assert [dataset.records[i].label for i in range(len(dataset))] == [
        "lines 2, 3 (id 'v1')",
        "line 9 (id 'v4')",
    ]
    v1, v4 = dataset[0], dataset[1]
    assert v1["captions"] == ["a red square moves left", "a square, moving"]
    assert v1["video"].shape == (4, 32, 48, 3) and v1["num_padded_frames"] == 0
    assert np.abs(v1["video"].astype(int) - files.solid_frames(6)[[0, 2, 3, 5]]).max() <= 4
    assert v1["sample_rate"] == 16000 and v1["audio"].dtype == np.float32 and len(v1["audio"]) >= 8000
    assert v4["num_padded_frames"] == 2 and v4["audio"] is None and v4["sample_rate"] is None


def test_video_random_sampling_follows_torch_seed(files):
    files.mp4("video/videos/v1.mp4", files.solid_frames(12))
    path = files.text("video/train.csv", "video_id,sentence\nv1,a clip\n")
    torch.manual_seed(0)
    dataset = read_video_captions(path, num_frames=3, sampling="random")  # its media check draws nothing
    assert torch.rand(()) == torch.rand((), generator=torch.Generator().manual_seed(0))
    draws = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        draws.append(dataset[0]["video"][:, 0, 0, 0])
    np.testing.assert_array_equal(draws[0], draws[1])
    assert any(not np.array_equal(draws[0], other) for other in draws[2:])


def test_audio_captions(files, bad_sample):
    tone = files.sine(0.25)
    files.wav("audio/clips/a0.wav", tone)
    files.truncated("audio/clips/a1.wav", files.wav("audio/whole.wav", tone))
    slow = files.sine(0.25, sample_rate=22050)
    files.wav("audio/clips/a2.wav", slow, sample_rate=22050)
    records = [
        {"id": "a0", "audio": "clips/a0.wav", "caption": "a beep"},
        {"id": "a1", "audio": "clips/a1.wav", "caption": "a cut beep"},
        {"id": "a2", "audio": "clips/a2.wav", "caption": "a slow beep"},
        {"id": "a3", "audio": "clips/a0.wav", "caption": ""},
        {"id": "a4", "audio": "clips/a4.wav", "caption": "nothing"},
    ]
    path = files.json("audio/train.json", records)
    clips = files.root / "audio/clips"
    error = bad_sample(read_audio_captions, path)
    assert error.reason is BadReason.CORRUPT_AUDIO
    truncated = "truncated: data chunk declares 8000 bytes, the file holds 3978"
    assert str(error) == f"{path}, index 1 (id 'a1'): {clips}/a1.wav: {truncated}"
    files.json("audio/train.json", [records[0], records[2]])
    error = bad_sample(read_audio_captions, path)
    assert error.reason is BadReason.WRONG_SAMPLE_RATE
    assert str(error).startswith(
        f"{path}, index 1 (id 'a2'): {clips}/a2.wav: sample rate 22050 Hz, expected 16000"
    )

    files.json("audio/train.json", records)
    dataset = read_audio_captions(path, on_bad_sample="skip")
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["a0"]
    assert dataset.counter.summary() == {
        "corrupt_audio": 1,
        "empty_text": 1,
        "missing_file": 1,
        "wrong_sample_rate": 1,
    }
    sample = dataset[0]
    assert sample["sample_rate"] == 16000 and sample["caption"] == "a beep"
    np.testing.assert_allclose(sample["audio"], tone, atol=1 / 32768)

    resampled = read_audio_captions(path, resample=True, on_bad_sample="skip")
    assert [resampled[i]["id"] for i in range(len(resampled))] == ["a0", "a2"]
    assert resampled[1]["sample_rate"] == 16000 and resampled[1]["audio"].shape == (4000,)


def test_video_and_audio_qa_find_media_by_id(files, bad_sample):
    files.mp4("video/videos/v1.mp4", files.solid_frames(4), files.sine(0.5))
    question = {"question": "What makes a sound?", "answer": "the circle", "type": "av_source"}
    qa = files.jsonl(
        "video/avqa_train.jsonl", [{"video_id": "v1", **question}, {"video_id": "v9", **question}]
    )
    dataset = read_video_qa(qa, num_frames=2, with_audio=True, on_bad_sample="skip")
    assert len(dataset) == 1 and dataset.counter.summary() == {"missing_file": 1}
    sample = dataset[0]
    assert sample["answer"] == "the circle" and sample["video"].shape == (2, 32, 48, 3)
    assert sample["sample_rate"] == 16000 and sample["audio"].dtype == np.float32

    files.wav("audio/clips/c0.wav", files.sine(0.25))
    question = {"question": "How many beeps?", "answer": "1", "type": "count"}
    qa = files.jsonl("audio/qa_train.jsonl", [{"id": "c0", **question}, {"id": "c1", **question}])
    error = bad_sample(read_audio_qa, qa)
    assert str(error) == f"{qa}, line 2 (id 'c1'): audio file '{files.root}/audio/clips/c1.wav' not found"
    dataset = read_audio_qa(qa, on_bad_sample="skip")
    assert len(dataset) == 1 and dataset.counter.summary() == {"missing_file": 1}
    assert dataset[0]["audio"].shape == (4000,) and dataset[0]["answer"] == "1"
