import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmfactory.losses.contrastive import clamp_logit_scale, clip_loss, gather_with_grad


def naive_clip_loss(video, text, log_logit_scale, max_logit_scale=100.0):
    n = video.shape[0]
    scale = torch.exp(torch.clamp(log_logit_scale, 0.0, math.log(max_logit_scale)))
    v = [video[i] / torch.sqrt((video[i] ** 2).sum()) for i in range(n)]
    w = [text[i] / torch.sqrt((text[i] ** 2).sum()) for i in range(n)]
    logits = [[scale * (v[i] * w[j]).sum() for j in range(n)] for i in range(n)]
    video_to_text = sum(
        -torch.log(torch.exp(logits[i][i]) / sum(torch.exp(x) for x in logits[i])) for i in range(n)
    )
    text_to_video = sum(
        -torch.log(torch.exp(logits[j][j]) / sum(torch.exp(logits[i][j]) for i in range(n))) for j in range(n)
    )
    return (video_to_text / n + text_to_video / n) / 2


def _features(seed=0, n=5, d=4):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    return video, text


def test_hand_computed():
    # Matched orthonormal pairs at scale 1: logits = I, each row -log(e / (e + 1)) = log(1 + e^-1).
    feats = torch.eye(2)
    assert clip_loss(feats, feats, torch.tensor(0.0)).item() == pytest.approx(0.3132617, abs=1e-6)
    # Scale 2 (temperature 0.5): log(1 + e^-2).
    assert clip_loss(feats, feats, torch.tensor(math.log(2.0))).item() == pytest.approx(0.1269280, abs=1e-6)


@pytest.mark.parametrize("log_scale", [0.5, math.log(20.0)])
def test_matches_naive_forward_and_grad(log_scale):
    video, text = _features()
    log_logit_scale = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    inputs = (video, text, log_logit_scale)
    got = clip_loss(*inputs)
    want = naive_clip_loss(*inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs), strict=True):
        torch.testing.assert_close(g, w)


def test_features_are_normalised_inside():
    video, text = _features()
    scale = torch.tensor(1.0)
    torch.testing.assert_close(clip_loss(3.0 * video, 0.5 * text, scale), clip_loss(video, text, scale))


def test_logit_scale_is_clamped_and_stops_receiving_gradient():
    video, text = _features()
    too_big = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    loss = clip_loss(video, text, too_big)
    torch.testing.assert_close(
        loss, clip_loss(video, text, torch.tensor(math.log(100.0), dtype=torch.float64))
    )
    assert torch.autograd.grad(loss, too_big)[0].item() == 0.0
    torch.testing.assert_close(clamp_logit_scale(torch.tensor(-1.0)), torch.tensor(0.0))
    torch.testing.assert_close(clamp_logit_scale(torch.tensor(9.0), 50.0), torch.tensor(math.log(50.0)))


def test_single_process_gather_is_identity_and_shapes_are_checked():
    assert not dist.is_initialized()
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(0.0))


# ---- two processes (gloo) == one process on the whole batch ----------------------------------------

WORLD_SIZE, LOCAL_BATCH, IN_DIM, EMBED_DIM = 2, 3, 6, 4


def _model_and_batch():
    """Identical on every process: two linear 'encoders', a log logit scale and a global batch of 6."""
    torch.manual_seed(0)
    video_encoder = torch.nn.Linear(IN_DIM, EMBED_DIM).double()
    text_encoder = torch.nn.Linear(IN_DIM, EMBED_DIM).double()
    log_logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
    params = [*video_encoder.parameters(), *text_encoder.parameters(), log_logit_scale]
    n = WORLD_SIZE * LOCAL_BATCH
    video_in, text_in = torch.randn(n, IN_DIM).double(), torch.randn(n, IN_DIM).double()
    return video_encoder, text_encoder, log_logit_scale, params, video_in, text_in


def _rank_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        video_encoder, text_encoder, log_logit_scale, params, video_in, text_in = _model_and_batch()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        loss = clip_loss(video_encoder(video_in[local]), text_encoder(text_in[local]), log_logit_scale)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [p.grad for p in params]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_match_one_process(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    video_encoder, text_encoder, log_logit_scale, params, video_in, text_in = _model_and_batch()
    loss = clip_loss(video_encoder(video_in), text_encoder(text_in), log_logit_scale)
    loss.backward()

    for result in ranks:
        torch.testing.assert_close(result["loss"], loss.detach())  # every rank sees the global-batch loss
    for i, param in enumerate(params):
        # DDP averages gradients over ranks: that average is the one-process gradient, scale included.
        ddp_grad = sum(result["grads"][i] for result in ranks) / WORLD_SIZE
        torch.testing.assert_close(ddp_grad, param.grad)
