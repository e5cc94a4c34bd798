"""Short clips of shapes that move, appear, disappear or change colour, with a matching audio track.

Every object of a clip has a distinct shape and colour, so "the star" and "the red object" are
unambiguous. About half of the objects make a sound (shape -> instrument, size -> pitch, event ->
pattern, see ``audio``), which is what audio-visual questions ask about.
"""

from dataclasses import dataclass, replace

import numpy as np

from mmfactory.world.audio import (
    INSTRUMENT_OF_SHAPE,
    SAMPLE_RATE,
    Sound,
    audio_question,
    sound_phrase,
    synthesize,
)
from mmfactory.world.captions import COLOR_ZH, SHAPE_ZH, capitalize, join_en, with_article
from mmfactory.world.rng import check_split, item_rng
from mmfactory.world.scenes import BACKGROUNDS, COLORS, RADIUS, SIZES, SceneObject, render, sample_object_kind

EVENTS = ("static", "moves", "appears", "disappears", "changes_color")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_ZH = {"left": "向左", "right": "向右", "up": "向上", "down": "向下"}
TRAVEL = 0.35  # distance a moving object covers over the clip, as a fraction of the frame
SOUNDING_PROBABILITY = 0.5
EVENT_TO_PATTERN = {
    "static": "steady",
    "moves": "pulsing",
    "appears": "starts_late",
    "disappears": "stops_early",
    "changes_color": "rising",
}


@dataclass(frozen=True)
class Track:
    """One object over a clip. ``frame`` is when it appears / disappears / changes colour."""

    shape: str
    color: str
    size: str
    event: str
    start: tuple[float, float]
    direction: str = ""
    frame: int = 0
    new_color: str = ""
    sounding: bool = False

    def position_at(self, t: int, frames: int) -> tuple[float, float]:
        if self.event != "moves":
            return self.start
        dx, dy = DIRECTIONS[self.direction]
        step = TRAVEL * t / (frames - 1)
        return self.start[0] + dx * step, self.start[1] + dy * step

    def visible_at(self, t: int) -> bool:
        return not (
            self.event == "appears" and t < self.frame or self.event == "disappears" and t >= self.frame
        )

    def object_at(self, t: int, frames: int) -> SceneObject | None:
        if not self.visible_at(t):
            return None
        color = self.new_color if self.event == "changes_color" and t >= self.frame else self.color
        return SceneObject(self.shape, color, self.size, *self.position_at(t, frames))

    def sound(self, fps: float) -> Sound:
        """The object's sound: instrument by shape, pitch by size (large is low), pattern by event."""
        pitch = "low" if self.size == "large" else "high"
        return Sound(INSTRUMENT_OF_SHAPE[self.shape], pitch, EVENT_TO_PATTERN[self.event], self.frame / fps)

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "event": self.event,
            "direction": self.direction,
            "frame": self.frame,
            "new_color": self.new_color,
            "sounding": self.sounding,
        }


@dataclass(frozen=True)
class Clip:
    tracks: tuple[Track, ...]
    background: str
    frames: int

    def objects_at(self, t: int) -> list[SceneObject]:
        return [o for o in (track.object_at(t, self.frames) for track in self.tracks) if o is not None]


def _sample_track(
    rng: np.random.Generator, shape: str, color: str, frames: int, colors_used: set[str]
) -> Track:
    size = SIZES[rng.integers(2)]
    r = RADIUS[size]
    event = EVENTS[rng.integers(len(EVENTS))]
    direction, frame, new_color = "", 0, ""
    lo, hi = np.full(2, r), np.full(2, 1 - r)
    if event == "moves":
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        d = np.array(DIRECTIONS[direction])
        lo, hi = lo - np.minimum(d, 0) * TRAVEL, hi - np.maximum(d, 0) * TRAVEL
    elif event in ("appears", "disappears", "changes_color"):
        frame = int(rng.integers(2, frames - 1))
        if event == "changes_color":
            options = [c for c in COLORS if c not in colors_used]
            new_color = options[rng.integers(len(options))]
    start = tuple(float(v) for v in rng.uniform(lo, hi))
    sounding = bool(rng.random() < SOUNDING_PROBABILITY)
    return Track(shape, color, size, event, start, direction, frame, new_color, sounding)


def _collide(a: Track, b: Track, frames: int) -> bool:
    gap = RADIUS[a.size] + RADIUS[b.size]
    return any(
        np.hypot(*np.subtract(a.position_at(t, frames), b.position_at(t, frames))) < gap
        for t in range(frames)
        if a.visible_at(t) and b.visible_at(t)
    )


def sample_clip(rng: np.random.Generator, frames: int = 8, max_objects: int = 3) -> Clip:
    """1..max_objects tracks with distinct shapes and colours that never overlap; at least one sounds."""
    if frames < 4 or not 1 <= max_objects <= 4:
        raise ValueError(f"need frames >= 4 and 1 <= max_objects <= 4, got {frames} and {max_objects}")
    n = int(rng.integers(1, max_objects + 1))
    tracks: list[Track] = []
    while len(tracks) < n:
        shape, color = sample_object_kind(rng)
        colors_used = {c for t in tracks for c in (t.color, t.new_color) if c}
        if shape in {t.shape for t in tracks} or color in colors_used:
            continue
        track = _sample_track(rng, shape, color, frames, colors_used | {color})
        if not any(_collide(track, other, frames) for other in tracks):
            tracks.append(track)
    if not any(t.sounding for t in tracks):
        k = int(rng.integers(n))
        tracks[k] = replace(tracks[k], sounding=True)
    return Clip(tuple(tracks), list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], frames)


def render_clip(clip: Clip, size: int = 32) -> np.ndarray:
    """``uint8 [T, size, size, 3]``."""
    return np.stack([render(clip.objects_at(t), clip.background, size) for t in range(clip.frames)])


def clip_sounds(clip: Clip, fps: float) -> list[Sound]:
    """The sounds of the clip's sounding objects, in track order."""
    return [t.sound(fps) for t in clip.tracks if t.sounding]


def clip_audio(clip: Clip, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The clip's audio track ``float32 [round(T / fps * sample_rate)]``: the sounding objects' sounds."""
    return synthesize(clip_sounds(clip, fps), clip.frames / fps, sample_rate)


def event_phrase(track: Track, lang: str, color: bool = True) -> str:
    """ "a red star moves to the right" / "红色星形向右移动" (colour optional)."""
    if lang == "en":
        name = with_article(f"{track.color} {track.shape}" if color else track.shape)
        verb = {
            "static": "stays still",
            "moves": f"moves {'to the ' if track.direction in ('left', 'right') else ''}{track.direction}",
            "appears": "appears",
            "disappears": "disappears",
            "changes_color": f"turns {track.new_color}",
        }[track.event]
        return f"{name} {verb}"
    name = (COLOR_ZH[track.color] if color else "") + SHAPE_ZH[track.shape]
    verb = {
        "static": "静止不动",
        "moves": f"{DIRECTION_ZH.get(track.direction, '')}移动",
        "appears": "出现了",
        "disappears": "消失了",
        "changes_color": f"变成了{COLOR_ZH.get(track.new_color, '')}",
    }[track.event]
    return name + verb


def clip_captions(clip: Clip, lang: str = "en") -> list[str]:
    """Two captions: every object's event with colours, and the first changing object's without colour."""

    def sentence(tracks: list[Track], color: bool) -> str:
        phrases = [event_phrase(t, lang, color) for t in tracks]
        return capitalize(join_en(phrases)) + "." if lang == "en" else "，".join(phrases) + "。"

    changing = [t for t in clip.tracks if t.event != "static"] or list(clip.tracks)
    return [sentence(list(clip.tracks), True), sentence(changing[:1], False)]


def video_question(clip: Clip, rng: np.random.Generator) -> dict:
    """``{"question", "answer", "type"}``, type in direction, color_change, appearance, disappearance,
    count, color."""
    by_event: dict[str, list[Track]] = {}
    for t in clip.tracks:
        by_event.setdefault(t.event, []).append(t)
    options = ["count", "color"]
    options += [e for e in ("moves", "changes_color") if e in by_event]
    options += [e for e in ("appears", "disappears") if len(by_event.get(e, [])) == 1]
    choice = options[rng.integers(len(options))]
    track = by_event[choice][rng.integers(len(by_event[choice]))] if choice in by_event else None
    if choice == "moves":
        return {
            "question": f"Which way does the {track.shape} move?",
            "answer": track.direction,
            "type": "direction",
        }
    if choice == "changes_color":
        return {
            "question": f"What color does the {track.shape} turn?",
            "answer": track.new_color,
            "type": "color_change",
        }
    if choice in ("appears", "disappears"):
        qtype = "appearance" if choice == "appears" else "disappearance"
        return {
            "question": f"Which object {choice}?",
            "answer": f"{track.color} {track.shape}",
            "type": qtype,
        }
    if choice == "count":
        answer = str(len(clip.objects_at(clip.frames - 1)))
        return {"question": "How many objects are visible at the end?", "answer": answer, "type": "count"}
    track = clip.tracks[rng.integers(len(clip.tracks))]
    return {
        "question": f"What color is the {track.shape} at the start?",
        "answer": track.color,
        "type": "color",
    }


def av_question(clip: Clip, rng: np.random.Generator) -> dict | None:
    """A question that needs both streams: the audio says which instrument sounds, the video which
    coloured object that instrument belongs to. Type in av_color, av_position, av_existence.

    One stream alone answers at chance: every question is about a clip with several objects, colour and
    position ask for the one sounding object among 2-3, and existence asks about a sounding and a silent
    object equally often, so "yes" is right half the time. None when no such question fits the clip (one
    object, or every object sounding and more than one of them).
    """
    sounding = [t for t in clip.tracks if t.sounding]
    silent = [t for t in clip.tracks if not t.sounding]
    if len(clip.tracks) < 2:
        return None
    options = ["av_existence"] if silent else []
    if len(sounding) == 1 and sounding[0].event != "changes_color":
        options.append("av_color")
    if len(sounding) == 1 and sounding[0].visible_at(0):
        options.append("av_position")
    if not options:
        return None
    qtype = options[rng.integers(len(options))]
    if qtype == "av_color":
        return {
            "question": "What color is the object making a sound?",
            "answer": sounding[0].color,
            "type": qtype,
        }
    if qtype == "av_position":
        position = sounding[0].object_at(0, clip.frames).position
        return {
            "question": "Where is the object making a sound at the start?",
            "answer": position,
            "type": qtype,
        }
    pool = sounding if rng.random() < 0.5 else silent
    track = pool[rng.integers(len(pool))]
    return {
        "question": f"Is the {track.color} object making a sound?",
        "answer": "yes" if track.sounding else "no",
        "type": qtype,
    }


def av_which_question(clip: Clip) -> dict | None:
    """ "Which object is making a sound?" answered "red star": a kind no training data asks (the zero-shot
    probe of Audio-Visual LLM), composed of skills that are trained (which instrument sounds, from the audio;
    naming an object by colour and shape, as video QA's appearance questions do). None unless the clip has
    several objects of which exactly one sounds, and that one keeps its colour."""
    sounding = [t for t in clip.tracks if t.sounding]
    if len(clip.tracks) < 2 or len(sounding) != 1 or sounding[0].event == "changes_color":
        return None
    track = sounding[0]
    return {
        "question": "Which object is making a sound?",
        "answer": f"{track.color} {track.shape}",
        "type": "av_which",
        "keywords": {"color": track.color, "shape": track.shape},
    }


AV_INSTRUCTION_KINDS = ("conversation", "narrative")  # the third kind, reasoning, is av_question


def av_narrative(clip: Clip, fps: float) -> str:
    """What is seen, then each sound with the object that makes it: "A red star moves to the right and a
    blue ring stays still. The red star makes the sound: a high buzzer beeps repeatedly." The audio
    caption alone would leave which object sounds unsaid, which is what audio-visual questions ask."""
    sources = [
        f"The {t.color} {t.shape} makes the sound: {sound_phrase(t.sound(fps), 'en')}."
        for t in clip.tracks
        if t.sounding
    ]
    return " ".join([clip_captions(clip)[0], *sources])


DESCRIBE_VIDEO = "Describe the video briefly."
DESCRIBE_SOUND = "Describe what you hear."
DESCRIBE_BOTH = "Describe what you see and hear."


def av_instruction(clip: Clip, fps: float, rng: np.random.Generator, kind: str) -> list[tuple[str, str]]:
    """Audio-Visual LLM's video instruction data of one ``kind``, as ``[(question, answer), ...]`` turns
    made from the clip's ground truth (the paper has an LLM write them from annotations):

    * ``conversation``: 2-3 turns about what is seen and what is heard (a video question, a question about
      the audio track, in a random order, sometimes a brief description of the video first);
    * ``narrative``: one description of both streams that says which object makes which sound
      (:func:`av_narrative`).

    The third kind, reasoning questions that need both streams, is :func:`av_question`.
    """
    sounds = clip_sounds(clip, fps)
    if kind == "narrative":
        return [(DESCRIBE_BOTH, av_narrative(clip, fps))]
    if kind != "conversation":
        raise ValueError(f"unknown instruction kind {kind!r}; expected one of {AV_INSTRUCTION_KINDS}")
    seen, heard = video_question(clip, rng), audio_question(sounds, rng)
    turns = [(seen["question"], seen["answer"]), (heard["question"], heard["answer"])]
    if rng.random() < 0.5:
        turns.reverse()
    if rng.random() < 0.5:
        turns.insert(0, (DESCRIBE_VIDEO, clip_captions(clip)[0]))
    return turns


def clip_at(seed: int, split: str, index: int, frames: int = 8, max_objects: int = 3) -> Clip:
    """Clip ``index`` of ``split``; shared by videos, video QA and audio-visual QA."""
    check_split(split)
    return sample_clip(item_rng(seed, "video", split, index), frames, max_objects)


def video_sample(clip: Clip, video_id: str, size: int = 32, fps: float = 8.0) -> dict:
    """``{"video_id", "video": uint8 [T, size, size, 3], "audio": float32 [S], "sample_rate",
    "captions": [en], "captions_zh": [zh], "tracks": [dict], "background"}``."""
    return {
        "video_id": video_id,
        "video": render_clip(clip, size),
        "audio": clip_audio(clip, fps),
        "sample_rate": SAMPLE_RATE,
        "captions": clip_captions(clip, "en"),
        "captions_zh": clip_captions(clip, "zh"),
        "tracks": [t.to_dict() for t in clip.tracks],
        "background": clip.background,
    }
