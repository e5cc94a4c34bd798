"""Synthesised 16 kHz mono sound: each object kind an instrument timbre, each event a rhythm or pitch.

A sound is an instrument (a set of partials) at a pitch (low/high) playing a pattern: ``steady``,
``pulsing`` (short beeps), ``starts_late``, ``stops_early`` or ``rising`` (a pitch step up at a time).
Videos use the same synthesiser: shape -> instrument, size -> pitch, visual event -> pattern.
"""

from dataclasses import dataclass

import numpy as np

from mmfactory.world.captions import capitalize, join_en
from mmfactory.world.rng import check_split, item_rng

SAMPLE_RATE = 16000
# instrument: ((partial frequency ratio, amplitude), ...), onset decay rate in 1/s (0 = sustained)
TIMBRES: dict[str, tuple[tuple[tuple[float, float], ...], float]] = {
    "flute": (((1, 1.0), (2, 0.15)), 0.0),
    "organ": (((1, 1.0), (3, 0.5), (5, 0.3), (7, 0.2)), 0.0),
    "bell": (((1, 1.0), (2.76, 0.6), (5.4, 0.4)), 6.0),
    "chime": (((1, 0.6), (4.2, 1.0), (7.1, 0.5)), 4.0),
    "buzzer": (tuple((k, 1.0 / k) for k in range(1, 11)), 0.0),
    "horn": (((1, 1.0), (2, 0.8), (3, 0.6), (4, 0.4), (5, 0.2)), 0.0),
    "whistle": (((2, 1.0), (4, 0.05)), 0.0),
    "harp": (((1, 1.0), (2, 0.5), (3, 0.33), (4, 0.25)), 8.0),
}
INSTRUMENT_OF_SHAPE = dict(
    zip(("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon"), TIMBRES, strict=True)
)
INSTRUMENT_ZH = {
    "flute": "长笛",
    "organ": "风琴",
    "bell": "铃铛",
    "chime": "风铃",
    "buzzer": "蜂鸣器",
    "horn": "号角",
    "whistle": "口哨",
    "harp": "竖琴",
}
PITCH_HZ = {"low": 220.0, "high": 587.3}
PITCH_ZH = {"low": "低音", "high": "高音"}
PATTERNS = ("steady", "pulsing", "starts_late", "stops_early", "rising")
PATTERN_EN = {
    "steady": "plays steadily",
    "pulsing": "beeps repeatedly",
    "starts_late": "starts partway through",
    "stops_early": "stops partway through",
    "rising": "rises in pitch",
}
PATTERN_ZH = {
    "steady": "持续鸣响",
    "pulsing": "反复短响",
    "starts_late": "中途响起",
    "stops_early": "中途停止",
    "rising": "音调升高",
}
PULSE_PERIOD_S, PULSE_ON_S = 0.2, 0.08
RISE_RATIO = 1.5  # a fifth up
RAMP_S = 0.01  # fade in/out so that onsets do not click
AMPLITUDE = 0.3


@dataclass(frozen=True)
class Sound:
    """One source. ``time`` (seconds): onset (starts_late), offset (stops_early) or pitch step (rising)."""

    instrument: str
    pitch: str
    pattern: str
    time: float = 0.0

    def to_dict(self) -> dict:
        return {
            "instrument": self.instrument,
            "pitch": self.pitch,
            "pattern": self.pattern,
            "time": self.time,
        }


def _gate(sound: Sound, t: np.ndarray) -> np.ndarray:
    """On/off of the source over time ``t`` [S] as float, before ramps."""
    if sound.pattern == "pulsing":
        return (np.mod(t, PULSE_PERIOD_S) < PULSE_ON_S).astype(np.float64)
    if sound.pattern == "starts_late":
        return (t >= sound.time).astype(np.float64)
    if sound.pattern == "stops_early":
        return (t < sound.time).astype(np.float64)
    return np.ones_like(t)


def synthesize(sounds: list[Sound], duration_s: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mix of ``sounds``: ``float32 [round(duration_s * sample_rate)]`` in [-1, 1]."""
    n = round(duration_s * sample_rate)
    t = np.arange(n) / sample_rate
    mix = np.zeros(n)
    ramp = max(1, round(RAMP_S * sample_rate))
    for sound in sounds:
        partials, decay = TIMBRES[sound.instrument]
        freq = np.full(n, PITCH_HZ[sound.pitch])
        if sound.pattern == "rising":
            freq[t >= sound.time] *= RISE_RATIO
        phase = 2 * np.pi * np.cumsum(freq) / sample_rate
        tone = sum(a * np.sin(r * phase) for r, a in partials) / sum(a for _, a in partials)
        gate = _gate(sound, t)
        # smooth each on/off edge into a linear ramp (a causal moving average of the gate)
        envelope = np.convolve(np.concatenate([np.zeros(ramp), gate]), np.ones(ramp) / ramp, "valid")[:n]
        if decay:
            onsets = np.flatnonzero(np.diff(np.concatenate([[0.0], gate])) > 0)
            since = t - t[onsets[np.maximum(np.searchsorted(onsets, np.arange(n), "right") - 1, 0)]]
            envelope = envelope * (0.3 + 0.7 * np.exp(-decay * since))
        mix += AMPLITUDE * envelope * tone
    return np.clip(mix, -1.0, 1.0).astype(np.float32)


def sound_phrase(sound: Sound, lang: str) -> str:
    if lang == "en":
        return f"a {sound.pitch} {sound.instrument} {PATTERN_EN[sound.pattern]}"
    return PITCH_ZH[sound.pitch] + INSTRUMENT_ZH[sound.instrument] + PATTERN_ZH[sound.pattern]


def audio_caption(sounds: list[Sound], lang: str = "en") -> str:
    """E.g. "A high flute plays steadily and a low bell beeps repeatedly." (en) or
    "高音长笛持续鸣响，低音铃铛反复短响。" (zh)."""
    phrases = [sound_phrase(s, lang) for s in sounds]
    return capitalize(join_en(phrases)) + "." if lang == "en" else "，".join(phrases) + "。"


def sample_sounds(rng: np.random.Generator, duration_s: float, max_sources: int = 3) -> list[Sound]:
    """1..max_sources sources with distinct instruments; event times in the middle of the clip."""
    n = int(rng.integers(1, max_sources + 1))
    instruments = [list(TIMBRES)[i] for i in rng.permutation(len(TIMBRES))[:n]]
    return [
        Sound(
            instrument,
            ("low", "high")[rng.integers(2)],
            PATTERNS[rng.integers(len(PATTERNS))],
            round(float(rng.uniform(0.3, 0.7)) * duration_s, 3),
        )
        for instrument in instruments
    ]


def audio_question(sounds: list[Sound], rng: np.random.Generator) -> dict:
    """``{"question", "answer", "type"}`` with type in count, source, pitch, existence."""
    sound = sounds[rng.integers(len(sounds))]
    unique_pattern = sum(s.pattern == sound.pattern for s in sounds) == 1
    qtype = ("count", "source", "pitch", "existence")[rng.integers(4)]
    if qtype == "source" and not unique_pattern:
        qtype = "pitch"
    if qtype == "count":
        return {
            "question": "How many different sounds can you hear?",
            "answer": str(len(sounds)),
            "type": qtype,
        }
    if qtype == "source":
        question = f"Which instrument {PATTERN_EN[sound.pattern]}?"
        return {"question": question, "answer": sound.instrument, "type": qtype}
    if qtype == "pitch":
        return {"question": f"Is the {sound.instrument} high or low?", "answer": sound.pitch, "type": qtype}
    present = rng.random() < 0.5
    absent = [i for i in TIMBRES if i not in {s.instrument for s in sounds}]
    instrument = sound.instrument if present else absent[rng.integers(len(absent))]
    question = f"Is there a {instrument} sound?"
    return {"question": question, "answer": "yes" if present else "no", "type": qtype}


def sounds_at(seed: int, split: str, index: int, duration_s: float = 1.0) -> list[Sound]:
    """The sources of audio clip ``index`` of ``split``; shared by audio clips and audio QA."""
    check_split(split)
    return sample_sounds(item_rng(seed, "audio", split, index), duration_s)


def audio_clip(
    seed: int, split: str, index: int, duration_s: float = 1.0, sample_rate: int = SAMPLE_RATE
) -> dict:
    """Clip ``index`` of ``split``: ``{"id", "audio": float32 [S], "sample_rate", "caption", "caption_zh",
    "sounds": [dict]}``."""
    sounds = sounds_at(seed, split, index, duration_s)
    return {
        "id": f"{split}-{index:06d}",
        "audio": synthesize(sounds, duration_s, sample_rate),
        "sample_rate": sample_rate,
        "caption": audio_caption(sounds, "en"),
        "caption_zh": audio_caption(sounds, "zh"),
        "sounds": [s.to_dict() for s in sounds],
    }


def audio_qa_item(
    seed: int, split: str, index: int, duration_s: float = 1.0, sample_rate: int = SAMPLE_RATE
) -> dict:
    """A question about clip ``index``: the clip's fields plus ``question``, ``answer``, ``type``."""
    question = audio_question(
        sounds_at(seed, split, index, duration_s), item_rng(seed, "audio-qa", split, index)
    )
    return {**audio_clip(seed, split, index, duration_s, sample_rate), **question}
