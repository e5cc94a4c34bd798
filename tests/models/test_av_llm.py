"""AudioVisualLM and its processor: each modality's features land in its own sample's positions in a batch
mixing visual-only, audio-only and audio-visual samples; each encoder runs once per batch, on exactly the
items that carry its stream (none at all when no sample does); modality tokens and spans as documented;
log-mel equal to transformers' numpy WhisperFeatureExtractor; any rate / stereo resampled; save / load give
equal logits; bad media named by the bad-sample policy."""

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from transformers import WhisperFeatureExtractor

from mmfactory.data.av import (
    MODALITY_MARKERS,
    AVProcessor,
    AVSample,
    check_av_media,
    modality,
)
from mmfactory.data.media import log_mel
from mmfactory.data.multimodal import MultimodalProcessor
from mmfactory.data.policy import BadReason, BadSampleError
from mmfactory.models.audio import AudioTowerConfig
from mmfactory.models.av_llm import AudioVisualLM, AudioVisualLMSpec, build_audio_visual_lm
from mmfactory.models.lm import CausalLMConfig
from mmfactory.models.vision import VisionTowerConfig
from mmfactory.world import World
from tests.helpers import TINY_LM

TINY_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 8,
}  # 4 tokens per frame
TINY_AUDIO = {
    "d_model": 16,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "num_mel_bins": 80,
    "max_source_positions": 50,
}  # 1 s clips


def tiny_av(seed: int = 0, modality_tokens: bool = True, **spec):
    set_seed(seed)
    model, tokenizer, image_processor, extractor = build_audio_visual_lm(
        AudioVisualLMSpec(
            vision=VisionTowerConfig(tiny=TINY_VISION),
            audio=AudioTowerConfig(tiny=TINY_AUDIO),
            lm=CausalLMConfig(tiny=dict(TINY_LM)),
            audio_tokens=3,
            video_frames=2,
            **spec,
        )
    )
    cfg = model.config
    base = MultimodalProcessor(tokenizer, image_processor, cfg.num_image_tokens)
    processor = AVProcessor(
        base, extractor, cfg.video_frames, cfg.num_video_tokens, cfg.audio_tokens, modality_tokens
    )
    return model.eval(), processor


def world_media(n: int = 3) -> list[dict]:
    videos = World(video_size=16).videos("train", n)
    return [{"video": v["video"], "audio": v["audio"], "sample_rate": v["sample_rate"]} for v in videos]


def samples(processor: AVProcessor, kinds: list[str], media: list[dict]) -> list[AVSample]:
    prefix = {"video": "<video>\n", "audio": "<audio>\n", "audio-visual": "<video>\n<audio>\n"}
    out = []
    for kind, m in zip(kinds, media, strict=True):
        messages = [
            {"role": "user", "content": prefix[kind] + "What happens?"},
            {"role": "assistant", "content": "A red star moves."},
        ]
        chat = processor.tokenize(messages)
        video = m["video"] if kind != "audio" else None
        audio = m["audio"] if kind != "video" else None
        out.append(AVSample(chat.input_ids, chat.labels, False, video, audio, m["sample_rate"]))
    return out


class Calls:
    """Per encoder, the batch size of each call."""

    def __init__(self, model: AudioVisualLM):
        self.sizes = {"vision": [], "audio": []}
        model.vision_tower.register_forward_pre_hook(
            lambda m, a, k: self.sizes["vision"].append(len(a[0])), with_kwargs=True
        )
        model.audio_tower.register_forward_pre_hook(
            lambda m, a, k: self.sizes["audio"].append(len(a[0])), with_kwargs=True
        )


def test_mixed_batch_places_each_modality_in_its_own_sample_and_runs_each_encoder_once():
    model, processor = tiny_av()
    media = world_media(3)
    kinds = ["video", "audio", "audio-visual"]
    batch = processor.collate(samples(processor, kinds, media))
    calls = Calls(model)
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], None, batch["video_values"], batch["audio_features"])
    # frames of the two samples with a video (T = 2 each), clips of the two with audio: one call each
    assert calls.sizes == {"vision": [4], "audio": [2]}
    assert batch["video_values"].shape[0] == 4 and batch["audio_features"].shape[0] == 2
    cfg = model.config
    with torch.no_grad():
        for row, kind, m in zip(range(3), kinds, media, strict=True):
            ids = batch["input_ids"][row]
            if kind != "audio":
                alone = model.encode_videos(processor.video_values([m["video"]]))[0]
                assert torch.allclose(embeds[row][ids == cfg.video_token_id], alone, atol=1e-5), kind
            else:
                assert not (ids == cfg.video_token_id).any()
            if kind != "video":
                alone = model.encode_audio(processor.audio_features([m["audio"]], [m["sample_rate"]]))[0]
                assert torch.allclose(embeds[row][ids == cfg.audio_token_id], alone, atol=1e-5), kind
            else:
                assert not (ids == cfg.audio_token_id).any()


def test_a_batch_without_audio_never_calls_the_audio_tower():
    model, processor = tiny_av()
    batch = processor.collate(samples(processor, ["video", "video"], world_media(2)))
    calls = Calls(model)
    with torch.no_grad():
        model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **{k: batch[k] for k in model.media_inputs},
        )
    assert calls.sizes == {"vision": [4], "audio": []}
    assert batch["audio_features"].shape[0] == 0


@pytest.mark.parametrize("modality_tokens", [True, False])
def test_modality_markers_and_spans(modality_tokens):
    model, processor = tiny_av(modality_tokens=modality_tokens)
    ids = processor.token_ids
    cfg = model.config
    for kind, sample in zip(
        ["video", "audio", "audio-visual"],
        samples(processor, ["video", "audio", "audio-visual"], world_media(3)),
        strict=True,
    ):
        tokens = sample.input_ids
        markers = [t for t in tokens if t in {ids[m] for m in MODALITY_MARKERS.values()}]
        assert markers == ([ids[MODALITY_MARKERS[kind]]] if modality_tokens else [])
        assert tokens.count(cfg.video_token_id) == (cfg.num_video_tokens if kind != "audio" else 0)
        assert tokens.count(cfg.audio_token_id) == (cfg.audio_tokens if kind != "video" else 0)
        if modality_tokens and kind == "audio-visual":
            start = tokens.index(ids[MODALITY_MARKERS[kind]])
            video_span = [ids["<vis>"], *[cfg.video_token_id] * cfg.num_video_tokens, ids["</vis>"]]
            assert tokens[start + 1 : start + 1 + len(video_span)] == video_span  # the marker, then the video
            begin = tokens.index(ids["<aud>"])
            audio_span = [ids["<aud>"], *[cfg.audio_token_id] * cfg.audio_tokens, ids["</aud>"]]
            assert begin > start + len(video_span) and tokens[begin : begin + len(audio_span)] == audio_span
        # nothing of the media side is learned
        learned = {t for t, label in zip(tokens, sample.labels, strict=True) if label != -100}
        assert not learned & {cfg.video_token_id, cfg.audio_token_id, *ids.values()}


def test_modality_of_a_conversation():
    assert modality([{"role": "user", "content": "<video>\n<audio>\nq"}]) == "audio-visual"
    assert modality([{"role": "user", "content": "<audio>\nq"}]) == "audio"
    assert modality([{"role": "user", "content": "q"}]) is None


def test_log_mel_equals_the_numpy_whisper_feature_extractor():
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    audio = World().audio_clips("train", 2)
    clips = [a["audio"] for a in audio]
    ours = log_mel(extractor, clips, [16000, 16000])
    reference = np.stack(
        [extractor._np_extract_fbank_features(np.pad(c, (0, 16000 - len(c)))[None], "cpu")[0] for c in clips]
    )
    assert ours.shape == (2, 80, 100)
    assert np.abs(ours.numpy() - reference).max() < 1e-3


def test_any_rate_and_stereo_are_resampled_to_16k_mono():
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    t = np.arange(44100) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([tone, tone], axis=1)  # [S, 2]
    t16 = np.arange(16000) / 16000
    reference = log_mel(extractor, [(0.3 * np.sin(2 * np.pi * 440 * t16)).astype(np.float32)], [16000])
    ours = log_mel(extractor, [stereo], [44100])
    # equal but for the resampler's filter transient at the clip's edges
    assert torch.allclose(ours[..., 2:-2], reference[..., 2:-2], atol=0.05)
    assert (ours - reference).abs().mean() < 0.01
    # the 440 Hz band is where the energy is, in both
    assert ours[0].mean(dim=1).argmax() == reference[0].mean(dim=1).argmax()


def test_save_and_load_give_equal_logits_and_processor(tmp_path):
    model, processor = tiny_av()
    batch = processor.collate(samples(processor, ["video", "audio", "audio-visual"], world_media(3)))
    inputs = {k: batch[k] for k in model.media_inputs}
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AudioVisualLM.from_pretrained(tmp_path).eval()
    reloaded = AVProcessor.from_pretrained(tmp_path, loaded.config)
    with torch.no_grad():
        before = model(batch["input_ids"], attention_mask=batch["attention_mask"], **inputs).logits
        after = loaded(batch["input_ids"], attention_mask=batch["attention_mask"], **inputs).logits
    assert torch.equal(before, after)
    again = reloaded.collate(samples(reloaded, ["video", "audio", "audio-visual"], world_media(3)))
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert torch.equal(again["audio_features"], batch["audio_features"])


def test_a_time_mean_video_has_one_frame_of_tokens():
    model, processor = tiny_av(video_pool="time_mean")
    assert model.config.num_video_tokens == model.config.num_image_tokens
    batch = processor.collate(samples(processor, ["video"], world_media(1)))
    with torch.no_grad():
        frames = model.encode_images(batch["video_values"])
        assert torch.allclose(model.encode_videos(batch["video_values"])[0], frames.mean(dim=0), atol=1e-6)


def test_bad_media_are_named_by_reason():
    av = [{"role": "user", "content": "<video>\n<audio>\nq"}]
    video = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(BadSampleError, match="no audio track") as err:
        check_av_media(av, {"video": video, "audio": None})
    assert err.value.reason == BadReason.MISSING_AUDIO
    with pytest.raises(BadSampleError, match="silent") as err:
        check_av_media(av, {"video": video, "audio": np.zeros(16000, np.float32)})
    assert err.value.reason == BadReason.SILENT_AUDIO
    with pytest.raises(BadSampleError, match="no video"):
        check_av_media([{"role": "user", "content": "<video>\nq"}], {"video": None, "audio": None})
    check_av_media([{"role": "user", "content": "<video>\nq"}], {"video": video, "audio": None})


def test_image_only_samples_train_beside_audio_visual_ones():
    model, processor = tiny_av()
    image = World(image_size=16).llava("train", 1)[0]["images"][0]
    chat = processor.tokenize(
        [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A star."}]
    )
    batch = processor.collate(
        [
            AVSample(chat.input_ids, chat.labels, False, images=[image]),
            *samples(processor, ["audio-visual"], world_media(1)),
        ]
    )
    with torch.no_grad():
        alone = model.encode_images(processor.base.pixel_values([image]))[0]
    calls = Calls(model)
    with torch.no_grad():
        embeds = model.embed_inputs(
            batch["input_ids"], batch["pixel_values"], batch["video_values"], batch["audio_features"]
        )
    assert calls.sizes == {"vision": [1, 2], "audio": [1]}  # the image, then the video's 2 frames
    assert torch.allclose(embeds[0][batch["input_ids"][0] == model.config.image_token_id], alone, atol=1e-5)
    assert not (batch["input_ids"][0] == model.config.video_token_id).any()


def test_a_skipped_encoder_still_gets_a_zero_gradient_in_training():
    """DDP needs a gradient for every trainable parameter: a batch without audio trains the audio side
    with zeros, and its loss is unchanged."""
    model, processor = tiny_av()
    batch = processor.collate(samples(processor, ["video", "video"], world_media(2)))
    inputs = {k: batch[k] for k in model.media_inputs}
    with torch.no_grad():
        reference = model(batch["input_ids"], attention_mask=batch["attention_mask"], **inputs).logits
    model.train()
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], **inputs).logits
    assert torch.allclose(logits, reference, atol=1e-6)
    logits.sum().backward()
    for name, parameter in model.named_parameters():
        if name.startswith(("audio_tower.", "audio_projector.")) and parameter.requires_grad:
            assert parameter.grad is not None and not parameter.grad.any(), name
    assert model.projector[0].weight.grad.abs().sum() > 0  # the video side trains for real


def test_a_stream_the_text_does_not_ask_for_is_dropped():
    from collections import Counter

    from mmfactory.data.av import AVChatDataset
    from mmfactory.data.samples import Samples

    _, processor = tiny_av()
    media = world_media(1)[0]  # a world video: frames and its audio track
    items = [
        {
            "id": "x",
            "messages": [{"role": "user", "content": "<video>\nq?"}, {"role": "assistant", "content": "a"}],
        }
    ]
    sample = AVChatDataset(Samples(items, lambda i: media), processor, 256, Counter())[0]
    assert sample.video is not None and sample.audio is None


def test_a_cut_through_a_span_delimiter_is_refused():
    _, processor = tiny_av()
    chat = processor.tokenize(
        [{"role": "user", "content": "<video>\n<audio>\nq?"}, {"role": "assistant", "content": "a"}]
    )
    closing = chat.input_ids.index(processor.token_ids["</aud>"])
    assert processor.fit(chat, closing) is None  # the cut falls just before </aud>
    assert processor.fit(chat, closing + 1) is not None


def test_settings_survive_save_and_load(tmp_path):
    model, processor = tiny_av(modality_tokens=False, video_pool="time_mean")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AudioVisualLM.from_pretrained(tmp_path)
    again = AVProcessor.from_pretrained(tmp_path, loaded.config)
    assert (loaded.config.video_pool, loaded.config.video_frames, loaded.config.audio_tokens) == (
        "time_mean",
        2,
        3,
    )
    assert again.modality_tokens is False and again.num_video_tokens == model.config.num_image_tokens
    messages = [{"role": "user", "content": "<video>\n<audio>\nq?"}]
    assert again.prompt(messages) == processor.prompt(messages)


@pytest.mark.parametrize("head", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_a_whisper_checkpoint_folder_loads_its_encoder_weights(tmp_path, head):
    import transformers

    from mmfactory.models.audio import load_audio_tower, tiny_whisper_config

    set_seed(1)
    checkpoint = getattr(transformers, head)(tiny_whisper_config(**TINY_AUDIO))
    checkpoint.save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(tmp_path)
    encoder, extractor = load_audio_tower(AudioTowerConfig(path=str(tmp_path)))
    expected = checkpoint.get_encoder().state_dict()
    assert encoder.state_dict().keys() == expected.keys()
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert extractor.nb_max_frames == 100


def test_the_dataset_counts_what_it_cannot_train():
    from collections import Counter

    from mmfactory.data.av import AVChatDataset
    from mmfactory.data.samples import Samples

    _, processor = tiny_av()
    media = world_media(1)[0]
    turn = [{"role": "user", "content": "<video>\\nq?"}, {"role": "assistant", "content": "a red star"}]
    items = [{"id": "x", "messages": turn}]
    full = len(processor.tokenize(turn).input_ids)
    for max_length, key in (
        (8, "train/skipped_media_cut"),
        (full - 1, "train/truncated"),
        (full, "train/samples"),
    ):
        counts = Counter()
        dataset = AVChatDataset(Samples(items, lambda i: media), processor, max_length, counts)
        assert counts[key] == 1 and len(dataset) == (key != "train/skipped_media_cut"), (
            max_length,
            dict(counts),
        )
