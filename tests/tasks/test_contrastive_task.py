"""video_text_contrastive: masking in training only, retrieval wiring, the step profile, CSV (MSR-VTT)."""

import csv
from collections import Counter

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfactory.config import ConfigError, StageConfig, TrainConfig
from mmfactory.data.source_config import SourceConfig
from mmfactory.data.sources import read_sources
from mmfactory.eval.flops import count_flops
from mmfactory.losses.contrastive import clip_loss
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.tasks.contrastive import fit_frames
from tests.helpers import world_data

TINY_MODEL = {
    "vision": {"image_size": 16, "patch_size": 4, "num_frames": 2, "hidden_size": 32, "num_layers": 1},
    "text": {
        "tiny": {
            "model_type": "bert",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
        },
        "pooling": "mean",
    },
    "projection_dim": 16,
}
WORLD_DATA = world_data(["videos"], 8, 6, image_size=16, num_frames=2)


def make_task(tmp_path, data=None, **options):
    stage = StageConfig(
        name="s",
        task="video_text_contrastive",
        model=TINY_MODEL,
        data=data or WORLD_DATA,
        options=options,
        train=TrainConfig(max_steps=1, batch_size=4),
    )
    torch.manual_seed(0)
    return build_task(stage, 0, StageContext(tmp_path, tmp_path / "s"))


def _token_counts(task, batch):
    """(vision tokens entering the first block, text tokens entering the encoder) for one forward."""
    seen = {}
    hooks = [
        task.model.vision_model.blocks[0].register_forward_hook(
            lambda m, a, o: seen.update(video=a[0].shape[1])
        ),
        task.model.text_model.embeddings.register_forward_hook(lambda m, a, o: seen.update(text=o.shape[1])),
    ]
    task(batch)
    for hook in hooks:
        hook.remove()
    return seen["video"], seen["text"]


def test_training_masks_and_evaluation_sees_full_inputs(tmp_path):
    task = make_task(tmp_path, video_mask_ratio=0.75, text_mask_ratio=0.5, text_mask_mode="drop")
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in range(4)])
    assert batch["video"].shape == (4, 2, 16, 16, 3) and batch["video"].dtype == torch.uint8
    length = batch["input_ids"].shape[1]
    task.train()
    video_tokens, text_tokens = _token_counts(task, batch)
    assert video_tokens == 1 + 2 * 4 and text_tokens < length  # 4 of 16 patches per frame; words dropped
    default = make_task(tmp_path, video_mask_ratio=0.75, text_mask_ratio=0.5).train()
    assert _token_counts(default, batch) == (1 + 2 * 4, length)  # [MASK] in place: the length is kept
    task.eval()
    assert _token_counts(task, batch) == (1 + 2 * 16, length)
    loss = task(batch)["loss"]
    torch.testing.assert_close(task(batch)["loss"], loss, rtol=0, atol=0)  # no randomness in evaluation
    out = task.model(batch["video"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(loss, clip_loss(out.video_embeds, out.text_embeds, out.log_logit_scale))


def test_image_text_sources_train_as_one_frame_clips(tmp_path):
    data = {
        "train": [{"format": "world", "kind": "scenes", "size": 6, "image_size": 16}],
        "eval": [{"format": "world", "kind": "scenes", "split": "val", "size": 4, "image_size": 16}],
        "num_frames": 1,
    }
    task = make_task(tmp_path, data=data)
    images = read_sources(
        [SourceConfig("world", kind="scenes", size=6, image_size=16)], "image-text", Counter(), "x"
    )
    videos = task.videos("train")
    assert [v["captions"] for v in videos.items] == images.captions  # every caption of every image
    assert np.array_equal(videos.media(2), images.image(2)[None])  # [1, H, W, 3]
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    assert batch["video"].shape == (4, 1, 16, 16, 3)
    task.train()
    assert _token_counts(task, batch)[0] == 1 + 4  # 75 % of an image's 16 patches dropped
    assert task.retrieval()["retrieval_videos"] == 4
    with pytest.raises(ConfigError, match="up front only"):
        streamed = {**data, "train": [{"format": "webdataset", "path": "x", "streaming": True}]}
        make_task(tmp_path, data=streamed)


def test_frame_and_caption_sampling(tmp_path):
    data = world_data(["videos"], 8, 6, image_size=16, languages=["en", "zh"], frame_sampling="random")
    task = make_task(tmp_path, data={**data, "num_frames": 2})
    videos = task.videos("train")
    captions = videos.items[0]["captions"]
    assert videos.media(0).shape == (8, 16, 16, 3) and len(captions) == 4  # 2 English + 2 Chinese
    torch.manual_seed(0)
    train_items = [task.train_dataset()[0] for _ in range(40)]
    assert {item["caption"] for item in train_items} == set(captions)
    frame_sets = {tuple(item["video"].reshape(2, -1).sum(1).tolist()) for item in train_items}
    assert len(frame_sets) > 1  # random frames from the segments
    eval_item = task.eval_dataset()[0]
    assert eval_item["caption"] == task.videos("eval").items[0]["captions"][0]
    assert np.array_equal(eval_item["video"], task.videos("eval").media(0)[[2, 6]])  # segment middles


def test_retrieval_maps_every_caption_to_its_video(tmp_path, monkeypatch):
    task = make_task(tmp_path, eval_batch_size=4).eval()  # 6 videos, 12 captions: several encoder calls
    videos = task.videos("eval")
    video_of_text = [i for i, v in enumerate(videos.items) for _ in v["captions"]]
    calls = {"video": 0, "text": 0}

    def one_hot(indices):
        return F.one_hot(torch.tensor(indices), len(videos)).float()

    def encode_video(video, *args, **kwargs):
        start = calls["video"]
        calls["video"] += len(video)
        return one_hot(list(range(start, calls["video"])))

    def encode_text(input_ids, *args, **kwargs):
        start = calls["text"]
        calls["text"] += len(input_ids)
        return one_hot([(video_of_text[j] + shift) % len(videos) for j in range(start, calls["text"])])

    monkeypatch.setattr(task.model, "encode_video", encode_video)
    monkeypatch.setattr(task.model, "encode_text", encode_text)
    shift = 0
    metrics = task.retrieval()
    assert metrics["retrieval_videos"] == 6 and metrics["retrieval_captions"] == 12
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_R@1"] == 100.0 and metrics[f"{direction}_MdR"] == 1.0
    shift, calls["video"], calls["text"] = 1, 0, 0  # every caption now points at the next video
    assert task.retrieval()["t2v_R@1"] == 0.0


def test_step_profile_shows_the_masking_savings_and_leaves_the_model_alone(tmp_path):
    masked = make_task(tmp_path, video_mask_ratio=0.75, text_mask_ratio=0.15, profile_steps=1)
    unmasked = make_task(tmp_path, video_mask_ratio=0.0, text_mask_ratio=0.0, profile_steps=1)
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    cost = masked.profile_training_step()
    assert cost["step_ms"] > 0 and cost["step_gflops"] > 0
    assert cost["step_gflops"] < 0.6 * unmasked.profile_training_step()["step_gflops"]
    assert all(p.grad is None for p in masked.parameters())
    assert all(torch.equal(v, before[k]) for k, v in masked.state_dict().items())


def test_count_flops_includes_cpu_attention():
    q = torch.randn(2, 4, 10, 8, requires_grad=True)  # [B, heads, N, d]
    matmul = 2 * 2 * 4 * 10 * 10 * 8  # one [N, d] x [d, N] product per (sample, head), 2 FLOPs per MAC
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * matmul  # scores, weighted sum
    # backward: recomputed scores plus the gradients of the two products (torch's formula)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) == 7 * matmul


def test_fit_frames_resizes_the_short_side_and_centre_crops():
    frames = torch.zeros(3, 24, 40, 3, dtype=torch.uint8)
    frames[..., 0] = 200
    frames[:, :, :4] = 0  # a black band on the left is cropped away
    out = fit_frames(frames, 12)
    assert out.shape == (3, 12, 12, 3) and out.dtype == torch.uint8
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()
    assert fit_frames(out, 12) is out


def _write_video(path, frames: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=4, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_csv_videos_train_and_evaluate(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        _write_video(tmp_path / "videos" / f"v{i}.mp4", rng.integers(0, 255, (6, 20, 24, 3), dtype=np.uint8))
        rows += [(f"v{i}", f"caption {i} one"), (f"v{i}", f"caption {i} two")]
    rows.append(("missing", "a video that is not there"))
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("video_id", "sentence"), *rows])
    source = {"format": "csv", "path": str(tmp_path / "train.csv"), "on_bad_sample": "skip"}
    data = {"train": [source], "eval": [{**source, "split": "val"}], "num_frames": 2}
    task = make_task(tmp_path, data=data, profile_steps=0)
    dataset = task.train_dataset()
    assert len(dataset) == 5
    batch = task.collate([dataset[i] for i in range(4)])
    assert batch["video"].shape == (4, 2, 16, 16, 3)  # 20 x 24 frames resized and centre-cropped
    assert torch.isfinite(task(batch)["loss"])
    metrics = task.eval().evaluate()
    assert metrics["retrieval_videos"] == 5 and metrics["retrieval_captions"] == 10
    assert 0 <= metrics["t2v_R@1"] <= 100 and 1 <= metrics["v2t_MdR"] <= 5
    report = task.data_report()
    assert report == {
        "train/videos": 5,
        "eval/videos": 5,
        "train/bad_missing_file": 1,
        "eval/bad_missing_file": 1,
    }


@pytest.mark.parametrize(
    ("options", "data", "message"),
    [
        ({"video_mask_ratio": 1.0}, WORLD_DATA, r"options.video_mask_ratio: must be in \[0, 1\)"),
        ({"video_mask_kind": "random"}, WORLD_DATA, "options.video_mask_kind"),
        ({}, {"train": [{"format": "csv"}]}, r"data.train\[0\].path: format 'csv' needs a path"),
        ({}, {"train": [{"format": "world", "kind": "labelled"}]}, "world kind 'labelled' yields"),
    ],
)
def test_config_errors_name_the_key(tmp_path, options, data, message):
    with pytest.raises(ConfigError, match=message):
        make_task(tmp_path, data=data, **options)
