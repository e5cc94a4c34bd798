import numpy as np
import pytest

from mmfactory.world import World
from mmfactory.world.audio import PITCH_HZ, SAMPLE_RATE, Sound, synthesize
from mmfactory.world.scenes import BACKGROUNDS


def test_video_shapes_and_audio_track():
    w = World(video_frames=8, video_size=32, fps=8.0)
    for v in w.videos("train", 4):
        assert v["video"].shape == (8, 32, 32, 3) and v["video"].dtype == np.uint8
        assert v["audio"].dtype == np.float32 and v["audio"].shape == (16000,)
        assert v["sample_rate"] == 16000 and np.abs(v["audio"]).max() <= 1.0
        assert np.abs(v["audio"]).max() > 0.05  # at least one object sounds
        assert len(v["captions"]) == len(v["captions_zh"]) == 2


def test_videos_are_deterministic_per_seed():
    a, b, c = World(seed=3).videos("val", 2), World(seed=3).videos("val", 2), World(seed=4).videos("val", 2)
    np.testing.assert_array_equal(a[1]["video"], b[1]["video"])
    np.testing.assert_array_equal(a[1]["audio"], b[1]["audio"])
    assert not np.array_equal(a[1]["video"], c[1]["video"])


def _foreground_centroid(frame: np.ndarray, background: str) -> np.ndarray:
    mask = np.any(frame != np.array(BACKGROUNDS[background]), axis=-1)
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()]) if len(xs) else np.full(2, np.nan)


def test_single_moving_object_moves_in_the_answered_direction():
    checked = 0
    for v in World(max_video_objects=1).video_qa("train", 40):
        track = v["tracks"][0]
        if track["event"] != "moves":
            continue
        start, end = (_foreground_centroid(v["video"][t], v["background"]) for t in (0, -1))
        dx, dy = end - start
        expected = {"left": dx < -3, "right": dx > 3, "up": dy < -3, "down": dy > 3}
        assert expected[track["direction"]], (track["direction"], dx, dy)
        assert v["type"] != "direction" or v["answer"] == track["direction"]
        checked += 1
    assert checked >= 3


def test_appearing_object_is_absent_before_its_frame():
    checked = 0
    for v in World(max_video_objects=1).videos("train", 40):
        track = v["tracks"][0]
        if track["event"] == "appears":
            blank = np.all(v["video"] == np.array(BACKGROUNDS[v["background"]]), axis=(1, 2, 3))
            assert blank.tolist() == [t < track["frame"] for t in range(8)]
            checked += 1
    assert checked >= 3


def test_av_answers_need_the_sounding_object():
    w = World()
    for v in w.av_qa("test", 30):
        sounding = [t for t in v["tracks"] if t["sounding"]]
        if v["type"] == "av_color":
            assert [t["color"] for t in sounding] == [v["answer"]]
        elif v["type"] == "av_existence":
            color = v["question"].split()[2]
            assert v["answer"] == ("yes" if any(t["color"] == color for t in sounding) else "no")


@pytest.mark.parametrize("pitch", ["low", "high"])
def test_steady_flute_has_its_pitch(pitch):
    audio = synthesize([Sound("flute", pitch, "steady")], 1.0)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()] == pytest.approx(
        PITCH_HZ[pitch], abs=1
    )


def test_audio_patterns_gate_the_sound():
    late = synthesize([Sound("organ", "low", "starts_late", time=0.5)], 1.0)
    early = synthesize([Sound("organ", "low", "stops_early", time=0.5)], 1.0)
    assert np.abs(late[:7000]).max() == 0 and np.abs(late[9000:]).max() > 0.1
    assert np.abs(early[9000:]).max() == 0 and np.abs(early[:7000]).max() > 0.1


def test_audio_clips_and_qa():
    w = World(audio_seconds=2.0)
    for clip in w.audio_qa("train", 10):
        assert clip["sample_rate"] == 16000 and clip["audio"].shape == (32000,)
        instruments = [s["instrument"] for s in clip["sounds"]]
        if clip["type"] == "count":
            assert clip["answer"] == str(len(instruments))
        elif clip["type"] == "existence":
            name = clip["question"].split()[3]
            assert clip["answer"] == ("yes" if name in instruments else "no")
        elif clip["type"] == "source":
            assert clip["answer"] in instruments
        assert all(s["instrument"] in clip["caption"] for s in clip["sounds"])


def test_av_questions_leave_one_stream_at_chance():
    qa = World().av_qa("test", 300)
    assert 0.4 < len(qa) / 300 < 0.7  # clips with several objects and a question that fits
    existence = [q["answer"] for q in qa if q["type"] == "av_existence"]
    assert abs(existence.count("yes") / len(existence) - 0.5) < 0.1
    for q in qa:
        assert len(q["tracks"]) >= 2
        if q["type"] in ("av_color", "av_position"):
            assert sum(t["sounding"] for t in q["tracks"]) == 1
