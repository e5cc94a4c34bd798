"""Audio-Visual LLM through the real CLI on tiny configs: alignment then instruction tuning on a mixture of
visual-only, audio-only and audio-visual samples learns (loss falls), the trainable parts move and the frozen
encoders stay bit-identical; every benchmark is scored with the streams the model knows; bad settings are
refused before anything trains."""

import json

import av
import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import ConfigError, load_recipe
from mmfactory.recipes import resolve_recipe
from mmfactory.tasks import validate_stage
from mmfactory.world import World
from mmfactory.world.export import write_mp4
from tests.helpers import TINY_LM, write_recipe
from tests.models.test_av_llm import TINY_AUDIO, TINY_VISION

BENCHMARKS = {
    "video_qa": 4,
    "audio_qa": 4,
    "av_qa": 4,
    "av_which": 4,
    "audio_captions": 2,
    "video_captions": 2,
}
EVAL = {"benchmarks": BENCHMARKS, "max_new_tokens": 4, "caption_max_new_tokens": 6, "frame_size": 16}
OPTIONS = {"eval": EVAL}


def sources(kinds: list[str], size: int, split: str = "train") -> list[dict]:
    return [{"format": "world", "kind": k, "split": split, "size": size, "image_size": 16} for k in kinds]


def tiny_av_recipe(modality_tokens: bool = True) -> dict:
    mixture = ["video_qa", "audio_qa", "av_qa", "av_conversations", "av_narratives"]
    return {
        "name": "test/av_llm",
        "defaults": {"train": {"batch_size": 8, "log_every": 10, "save_every": 1000, "seed": 0}},
        "stages": [
            {
                "name": "align",
                "task": "av_sft",
                "model": {
                    "vision": {"tiny": TINY_VISION},
                    "audio": {"tiny": TINY_AUDIO},
                    "lm": {"tiny": {**TINY_LM, "tie_word_embeddings": True}},
                    "audio_tokens": 3,
                    "video_frames": 2,
                },
                "data": {
                    "train": sources(["video_captions", "audio_captions"], 16),
                    "modality_tokens": modality_tokens,
                },
                "trainable": ["model.projector.*", "model.audio_*", "model.language_model.*"],
                "optimizer": {"lr": 3.0e-3},
                "train": {"max_steps": 40},
                "options": {"eval": {**EVAL, "benchmarks": {"audio_captions": 2}}},
            },
            {
                "name": "instruct",
                "task": "av_sft",
                "init_from": "align",
                "data": {
                    "train": sources(mixture, 16),
                    "eval": sources(["av_qa"], 8, "val"),
                    "modality_tokens": modality_tokens,
                },
                "trainable": ["model.projector.*", "model.audio_projector.*", "model.language_model.*"],
                "optimizer": {"lr": 3.0e-3},
                "train": {"max_steps": 40},
                "options": OPTIONS,
            },
        ],
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("av")
    out = tmp / "run"
    assert main(["run", str(write_recipe(tiny_av_recipe(), tmp / "r.yaml")), "--output", str(out)]) == 0
    return out


def test_mixture_training_learns_and_keeps_frozen_encoders_bit_identical(trained):
    out = trained
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    for stage in ("align", "instruct"):
        assert metrics[f"{stage}/train_loss"] < 0.8 * metrics[f"{stage}/train_first_loss"], stage
    for name in BENCHMARKS:
        key = f"instruct/{name}_{'cider_d' if name.endswith('captions') else 'accuracy'}"
        assert key in metrics and metrics[key] >= 0, key
    assert not any(k.startswith("align/video_qa") for k in metrics)  # align scores audio captions only
    for probe in ("av_qa_video_alone", "av_qa_audio_alone", "av_which_video_alone", "av_which_audio_alone"):
        assert f"instruct/{probe}_accuracy" in metrics, probe
    assert 0 <= metrics["instruct/av_which_mentions_color"] <= 100
    shown = (out / "instruct/examples/av_qa.jsonl").read_text().splitlines()
    first = json.loads(shown[0])
    assert first["fields"]["question"] and first["images"]  # the frames the model saw, beside the answer
    before = load_file(out / "align/final/model.safetensors")
    after = load_file(out / "instruct/final/model.safetensors")
    for name, value in before.items():
        trained = name.startswith(("projector.", "audio_projector.", "language_model."))
        assert torch.equal(after[name], value) != trained, (
            f"{name} {'did not change' if trained else 'changed'}"
        )
    assert any(k.startswith("audio_tower.") for k in before)
    processor_meta = json.loads((out / "instruct/final/mmfactory_av_processor.json").read_text())
    assert processor_meta == {"modality_tokens": True}


def test_a_single_stream_model_is_scored_with_its_stream_alone(tmp_path):
    recipe = tiny_av_recipe(modality_tokens=False)
    recipe["stages"][1]["options"] = {**OPTIONS, "streams": ["video"]}
    recipe["stages"][1]["data"]["train"] = sources(["video_qa", "video_captions"], 16)
    recipe["stages"][1]["train"]["max_steps"] = 4
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert "instruct/video_qa_accuracy" in metrics and "instruct/av_qa_accuracy" in metrics
    assert not any(k.startswith(("instruct/audio_qa", "instruct/audio_captions")) for k in metrics)
    assert not any("_alone" in k for k in metrics)  # a one-stream model has no probes
    assert json.loads((out / "instruct/final/mmfactory_av_processor.json").read_text()) == {
        "modality_tokens": False
    }


def test_the_shipped_recipe_validates():
    recipe = load_recipe(resolve_recipe("av_llm/tiny"))
    names = [stage.name for stage in recipe.stages]
    assert names[:3] == ["vision", "align", "instruct"]
    for i, stage in enumerate(recipe.stages):
        validate_stage(stage, i)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("options", {"eval": {"benchmarks": {"avqa": 4}}}, "unknown"),
        ("options", {"streams": []}, "streams"),
        ("options", {"eval": {"benchmarks": {"av_qa": -1}}}, "sizes"),
        ("model", {"audio_tokens": 0}, "audio_tokens"),
    ],
)
def test_bad_settings_are_refused_before_training(tmp_path, where, value, message):
    recipe = tiny_av_recipe()
    recipe["stages"][0][where] = {**recipe["stages"][0].get(where, {}), **value}
    path = write_recipe(recipe, tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match=message):
        validate_stage(load_recipe(path).stages[0], 0)


def write_silent_mp4(path, frames: np.ndarray) -> None:
    """An MP4 with a video stream and no audio stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=8, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def write_aac_mp4(path, frames: np.ndarray, seconds: float = 1.0, rate: int = 44100) -> None:
    """An MP4 whose audio track is stereo AAC at 44.1 kHz (as phones and cameras write them)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264rgb", rate=8, options={"qp": "0"})
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        audio = container.add_stream("aac", rate=rate, layout="stereo")
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
        chunk = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        chunk.sample_rate = rate
        for stream, item in ((audio, chunk), (audio, None), (video, None)):
            container.mux(stream.encode(item))


def test_generate_answers_about_real_video_and_audio_files(trained, tmp_path, capsys):
    clip = World(video_size=16).videos("test", 1)[0]
    write_mp4(tmp_path / "a.mp4", clip["video"], clip["audio"], clip["sample_rate"], 8.0)
    write_silent_mp4(tmp_path / "b.mp4", clip["video"])
    write_aac_mp4(tmp_path / "d.mp4", clip["video"])
    t = np.arange(44100) / 44100
    soundfile.write(tmp_path / "c.wav", 0.3 * np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1), 44100)
    model = str(trained / "instruct/final")
    for media in (
        ["--video", "a.mp4"],
        ["--video", "d.mp4"],
        ["--video", "b.mp4"],
        ["--audio", "c.wav"],
        ["--video", "b.mp4", "--audio", "c.wav"],
    ):
        args = [m if m.startswith("--") else str(tmp_path / m) for m in media]
        assert (
            main(["generate", "--model", model, *args, "--prompt", "What happens?", "--max-new-tokens", "4"])
            == 0
        )
        out = capsys.readouterr().out
        assert ">>> What happens?" in out
        assert ("has no audio track: answering from the video alone" in out) == (
            media == ["--video", "b.mp4"]
        )


def test_eval_scores_an_audio_visual_folder_with_the_streams_asked(trained, capsys):
    model = str(trained / "instruct/final")
    args = [
        "eval",
        "--model",
        model,
        "--vqa",
        "3",
        "--captions",
        "2",
        "--max-new-tokens",
        "4",
        "--frame-size",
        "16",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "av_qa_video_alone_accuracy" in printed and "audio_captions_cider_d" in printed
    assert main(["eval", "--model", model, "--vqa", "3", "--captions", "0", "--streams", "audio"]) == 0
    printed = capsys.readouterr().out
    assert "audio_qa_accuracy" in printed and "video_qa_accuracy" not in printed
    assert main(["eval", "--model", model, "--streams", "smell"]) == 2
    assert main(["eval", "--model", model, "--split", "test_compositional"]) == 2
