import numpy as np
import pytest
import soundfile
from PIL import Image

from mmfactory.data.media import frame_indices, load_audio, load_image, load_video, resample_audio
from mmfactory.data.policy import BadReason

# --- images ---------------------------------------------------------------------------------------


def test_load_image_round_trips_png_and_converts_modes(files):
    path = files.png("a.png", size=(12, 16))
    image = load_image(path)
    assert image.dtype == np.uint8 and image.shape == (12, 16, 3) and image.flags.writeable
    np.testing.assert_array_equal(image, np.asarray(Image.open(path)))
    np.testing.assert_array_equal(load_image(path.read_bytes()), image)
    assert load_image(path, resize_to=(6, 10)).shape == (6, 10, 3)
    Image.fromarray(np.full((5, 7), 200, np.uint8), mode="L").save(grey := files.root / "grey.png")
    np.testing.assert_array_equal(load_image(grey), np.full((5, 7, 3), 200, np.uint8))
    Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(rgba := files.root / "rgba.png")
    np.testing.assert_array_equal(load_image(rgba), np.broadcast_to([10, 20, 30], (3, 4, 3)))


def test_load_image_rejects_truncated_random_and_missing_files(files, bad_sample):
    truncated = files.truncated("t.png", files.png("a.png"))
    error = bad_sample(load_image, truncated)
    assert error.reason is BadReason.CORRUPT_IMAGE and str(error).startswith(
        f"{truncated}: cannot decode image: "
    )
    error = bad_sample(load_image, files.random_bytes("r.png").read_bytes())
    assert error.reason is BadReason.CORRUPT_IMAGE and str(error).startswith("cannot decode image: ")
    error = bad_sample(load_image, missing := files.root / "nope.png")
    assert error.reason is BadReason.MISSING_FILE and str(error) == f"{missing}: file not found"


# --- audio ----------------------------------------------------------------------------------------


def test_load_audio_reads_pcm16_and_mixes_stereo_to_mono(files):
    tone = files.sine(0.25)
    audio, rate = load_audio(files.wav("a.wav", tone), expected_sr=16000)
    assert audio.dtype == np.float32 and rate == 16000 and audio.shape == tone.shape
    np.testing.assert_allclose(audio, tone, atol=1 / 32768)  # PCM16 quantisation
    stereo = np.stack([tone, np.zeros_like(tone)], axis=1)
    mono, _ = load_audio(files.wav("s.wav", stereo))
    np.testing.assert_allclose(mono, tone / 2, atol=1 / 32768)


def test_load_audio_rejects_truncated_empty_and_wrong_rate(files, bad_sample):
    whole = files.wav("a.wav", files.sine(0.25))
    truncated = files.truncated("t.wav", whole)
    error = bad_sample(load_audio, truncated)  # 0.25 s of PCM16 = 8000 bytes, half of the file kept
    assert error.reason is BadReason.CORRUPT_AUDIO
    assert str(error) == f"{truncated}: truncated: data chunk declares 8000 bytes, the file holds 3978"
    header_only = files.truncated("h.wav", whole, keep=44)
    assert str(bad_sample(load_audio, header_only)).endswith("declares 8000 bytes, the file holds 0")
    error = bad_sample(load_audio, random := files.random_bytes("r.wav"))
    assert error.reason is BadReason.CORRUPT_AUDIO and str(error).startswith(
        f"{random}: cannot decode audio: "
    )
    soundfile.write(flac := files.root / "a.flac", files.sine(0.5), 16000)
    assert bad_sample(load_audio, files.truncated("t.flac", flac)).reason is BadReason.CORRUPT_AUDIO
    slow = files.wav("slow.wav", files.sine(0.25, sample_rate=22050), sample_rate=22050)
    error = bad_sample(load_audio, slow, expected_sr=16000)
    assert error.reason is BadReason.WRONG_SAMPLE_RATE
    assert str(error) == f"{slow}: sample rate 22050 Hz, expected 16000 Hz (resample=True converts it)"


def test_load_audio_resamples_when_asked(files):
    slow = files.wav("slow.wav", files.sine(0.5, sample_rate=22050), sample_rate=22050)
    audio, rate = load_audio(slow, expected_sr=16000, resample=True)
    assert rate == 16000 and audio.shape == (8000,)
    np.testing.assert_allclose(audio[200:-200], files.sine(0.5)[200:-200], atol=2e-3)


def _tone(length: int, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 300 * np.arange(length) / rate)).astype(np.float32)


@pytest.mark.parametrize(
    ("orig", "target", "length"), [(22050, 16000, 22050), (8000, 16000, 801), (44100, 16000, 4410)]
)
def test_resample_audio_matches_the_sine_at_the_new_rate(orig, target, length):
    """A 300 Hz sine resampled equals the sine sampled at the new rate (away from the edges)."""
    out = resample_audio(_tone(length, orig), orig, target)
    assert out.dtype == np.float32 and len(out) == round(length * target / orig)
    margin = len(out) // 8
    np.testing.assert_allclose(out[margin:-margin], _tone(len(out), target)[margin:-margin], atol=1e-4)


def test_resample_audio_short_input_and_same_rate():
    tone = _tone(30, 48000)
    out = resample_audio(tone, 48000, 16000)  # shorter than the filter: edge ringing only
    assert len(out) == 10
    np.testing.assert_allclose(out, _tone(10, 16000), atol=0.05)
    assert resample_audio(tone, 48000, 48000) is tone


# --- video ----------------------------------------------------------------------------------------


def test_frame_indices_uniform_random_and_short_videos():
    np.testing.assert_array_equal(frame_indices(10, 4, "uniform"), [1, 3, 6, 8])  # segment middles
    np.testing.assert_array_equal(frame_indices(4, 4, "uniform"), [0, 1, 2, 3])
    np.testing.assert_array_equal(frame_indices(3, 5, "random"), [0, 1, 2, 2, 2])  # last frame repeated
    draws = np.stack([frame_indices(10, 4, "random", np.random.default_rng(seed)) for seed in range(200)])
    segments = [(0, 2), (2, 5), (5, 7), (7, 10)]  # [i * 10 // 4, (i + 1) * 10 // 4)
    for column, (start, end) in enumerate(segments):
        assert set(draws[:, column]) == set(range(start, end))  # one frame per segment, every frame reachable
    np.testing.assert_array_equal(
        frame_indices(10, 4, "random", np.random.default_rng(1)),
        frame_indices(10, 4, "random", np.random.default_rng(1)),
    )
    with pytest.raises(ValueError, match="sampling"):
        frame_indices(10, 4, "middle")  # type: ignore[arg-type]


def test_load_video_decodes_frames_and_audio_within_tolerance(files):
    """H.264 crf 0 in yuv420p: flat colours come back within 4 levels. AAC keeps its priming samples
    (the decoded track is longer, by at most 2048 samples); once aligned by least squares, a tone
    that starts after 0.1 s of silence comes back within 0.01 from 0.1 s after its onset on."""
    frames, tone = files.solid_frames(10), files.sine(1.0)
    tone[:1600] = 0.0  # the onset makes the alignment unique
    path = files.mp4("v.mp4", frames, tone)
    clip = load_video(path, num_frames=4, with_audio=True, audio_sample_rate=None)
    assert (
        clip.frames.dtype == np.uint8 and clip.frames.shape == (4, 32, 48, 3) and clip.num_padded_frames == 0
    )
    assert np.abs(clip.frames.astype(int) - frames[[1, 3, 6, 8]]).max() <= 4
    assert clip.sample_rate == 16000 and clip.audio.dtype == np.float32
    assert len(tone) <= len(clip.audio) <= len(tone) + 2048
    errors = [
        np.mean((clip.audio[lag : lag + len(tone)] - tone) ** 2) for lag in range(len(clip.audio) - len(tone))
    ]
    lag = int(np.argmin(errors))
    np.testing.assert_allclose(clip.audio[lag + 3200 : lag + len(tone)], tone[3200:], atol=0.01)
    resampled = load_video(path, num_frames=4, with_audio=True, audio_sample_rate=8000)
    assert resampled.sample_rate == 8000 and len(resampled.audio) == round(len(clip.audio) / 2)


def test_load_video_pads_short_videos_and_handles_missing_audio(files):
    frames = files.solid_frames(3)
    clip = load_video(files.mp4("short.mp4", frames), num_frames=5, with_audio=True)
    assert clip.num_padded_frames == 2 and clip.audio is None and clip.sample_rate is None
    assert np.abs(clip.frames.astype(int) - frames[[0, 1, 2, 2, 2]]).max() <= 4


def test_load_video_rejects_random_bytes_and_missing_files(files, bad_sample):
    random = files.random_bytes("r.mp4")
    error = bad_sample(load_video, random, num_frames=2)
    assert error.reason is BadReason.CORRUPT_VIDEO and str(error).startswith(
        f"{random}: cannot decode video: "
    )
    error = bad_sample(load_video, missing := files.root / "gone.mp4", num_frames=2)
    assert error.reason is BadReason.MISSING_FILE and str(error) == f"{missing}: file not found"
