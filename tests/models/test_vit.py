"""SpaceTimeViT: mask sampling, dropped patches never reach the encoder, FLOPs follow the visible fraction,
parity with transformers' ViT on images, and the masked path against a naive select-then-encode reference."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from mmfactory.config import ConfigError
from mmfactory.eval.flops import count_flops
from mmfactory.models.components.vit import SpaceTimeViT, SpaceTimeViTConfig, num_visible, sample_patch_mask

TINY = SpaceTimeViTConfig(
    image_size=16, patch_size=4, num_frames=3, hidden_size=32, num_layers=2, num_heads=4
)


def tiny_vit(seed: int = 0, config: SpaceTimeViTConfig = TINY) -> SpaceTimeViT:
    torch.manual_seed(seed)
    return SpaceTimeViT(config).eval()


def pixels(batch: int = 2, frames: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, frames, size, size, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["frame", "tube"])
def test_mask_keeps_exactly_the_visible_count_and_differs_per_sample(kind):
    keep, mask = sample_patch_mask(6, 3, 64, 0.75, kind, torch.Generator().manual_seed(0))
    assert keep.shape == (6, 3, 16) and mask.shape == (6, 3, 64)
    assert (mask.sum(-1) == 48).all()  # 75% of 64 patches dropped in every frame of every sample
    assert (~mask).gather(-1, keep).all()  # the kept indices are exactly the unmasked patches
    assert all(len(set(row.tolist())) == 16 for row in keep.reshape(-1, 16))
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 6  # a different mask per sample
    if kind == "tube":
        assert (mask == mask[:, :1]).all()  # one spatial mask shared by all frames
    else:
        assert not (mask == mask[:, :1]).all()


def test_num_visible_rounds_and_keeps_at_least_one():
    assert num_visible(16, 0.0) == 16 and num_visible(16, 0.75) == 4 and num_visible(49, 0.75) == 12
    assert num_visible(16, 0.99) == 1
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        num_visible(16, 1.0)


def test_masked_patches_never_reach_the_encoder():
    vit, x = tiny_vit(), pixels()
    out = vit(x, mask_ratio=0.75, mask_kind="frame", generator=torch.Generator().manual_seed(3))
    assert out.tokens.shape == (2, 3 * 4, 32) and out.cls.shape == (2, 32)
    # Scribbling over every masked patch changes nothing; changing one visible patch changes the output.
    patch_mask = out.mask.view(2, 3, 4, 4, 1, 1, 1).expand(-1, -1, -1, -1, 4, 4, 3)  # rows, cols, P, P, C
    hidden = patch_mask.permute(0, 1, 2, 4, 3, 5, 6).reshape(x.shape)  # back to [B, T, H, W, 3]
    scribbled = torch.where(hidden, torch.rand_like(x), x)
    again = vit(scribbled, mask_ratio=0.75, mask_kind="frame", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.cls, out.cls, rtol=0, atol=0)
    visible = ~hidden
    touched = torch.where(visible & (torch.arange(16).view(1, 1, 16, 1, 1) < 4), 1 - x, x)
    changed = vit(touched, mask_ratio=0.75, mask_kind="frame", generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(changed.cls, out.cls)


def test_encoder_flops_scale_with_the_visible_fraction():
    vit, x = tiny_vit(), pixels(batch=4)
    tokens = 3 * 16
    full = count_flops(lambda: vit(x))
    for ratio in (0.5, 0.75):
        visible = 3 * num_visible(16, ratio)
        flops = count_flops(lambda r=ratio: vit(x, mask_ratio=r))
        linear_share = (1 + visible) / (1 + tokens)  # per-token layers scale with the token count (CLS too)
        assert linear_share**2 <= flops / full <= linear_share  # attention scales with its square
    assert count_flops(lambda: vit(x, mask_ratio=0.75)) < 0.4 * full  # MAC: "60% fewer FLOPs"


def test_no_masking_is_deterministic_and_uint8_equals_float():
    vit, x = tiny_vit(), pixels()
    as_uint8 = (x * 255).round().to(torch.uint8)
    out = vit(as_uint8)
    assert out.mask is None and out.tokens.shape == (2, 48, 32)
    torch.testing.assert_close(vit(as_uint8).cls, out.cls, rtol=0, atol=0)
    torch.testing.assert_close(vit(as_uint8.float() / 255).cls, out.cls)


def test_images_and_shorter_clips_use_the_first_temporal_positions():
    vit, x = tiny_vit(), pixels(frames=2)
    assert vit(x[:, 0]).tokens.shape == (2, 16, 32)  # [B, H, W, 3] is a 1-frame video
    torch.testing.assert_close(vit(x[:, 0]).cls, vit(x[:, :1]).cls)
    with torch.no_grad():
        vit.temporal_pos[2:] += 1.0  # positions past the clip length are not used
    assert vit(x).tokens.shape == (2, 32, 32)
    with pytest.raises(ValueError, match="expected"):
        vit(pixels(frames=4))
    with pytest.raises(ValueError, match="expected"):
        vit(pixels(size=20))


def test_config_validation():
    with pytest.raises(ConfigError, match="image_size"):
        SpaceTimeViT(SpaceTimeViTConfig(image_size=30, patch_size=8))
    with pytest.raises(ConfigError, match="num_heads"):
        SpaceTimeViT(SpaceTimeViTConfig(hidden_size=30, num_heads=4))


def _hf_vit_with_our_weights(vit: SpaceTimeViT) -> ViTModel:
    cfg = vit.config
    hf = (
        ViTModel(
            ViTConfig(
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=int(cfg.hidden_size * cfg.mlp_ratio),
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                hidden_act="gelu",
                layer_norm_eps=cfg.layer_norm_eps,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                qkv_bias=True,
            ),
            add_pooling_layer=False,
        )
        .eval()
        .to(vit.cls_token.dtype)
    )
    d, p = cfg.hidden_size, cfg.patch_size
    with torch.no_grad():
        # Our linear patchify flattens (row, column, channel); the Conv2d kernel is [D, C, P, P].
        hf.embeddings.patch_embeddings.projection.weight.copy_(
            vit.patch_embed.weight.view(d, p, p, 3).permute(0, 3, 1, 2)
        )
        hf.embeddings.patch_embeddings.projection.bias.copy_(vit.patch_embed.bias)
        hf.embeddings.cls_token.copy_(vit.cls_token)
        hf.embeddings.position_embeddings.copy_(
            torch.cat([torch.zeros(1, d), vit.spatial_pos + vit.temporal_pos[0]])[None]
        )
        for ours, theirs in zip(vit.blocks, hf.layers, strict=True):
            q, k, v = ours.attn.qkv.weight.chunk(3)
            qb, kb, vb = ours.attn.qkv.bias.chunk(3)
            attn = theirs.attention
            for proj, w, b in ((attn.q_proj, q, qb), (attn.k_proj, k, kb), (attn.v_proj, v, vb)):
                proj.weight.copy_(w)
                proj.bias.copy_(b)
            attn.o_proj.load_state_dict(ours.attn.proj.state_dict())
            theirs.layernorm_before.load_state_dict(ours.norm1.state_dict())
            theirs.layernorm_after.load_state_dict(ours.norm2.state_dict())
            theirs.mlp.fc1.load_state_dict(ours.mlp[0].state_dict())
            theirs.mlp.fc2.load_state_dict(ours.mlp[2].state_dict())
        hf.layernorm.load_state_dict(vit.norm.state_dict())
    return hf


def test_parity_with_transformers_vit_on_images_forward_and_gradient():
    vit = tiny_vit().double()
    hf = _hf_vit_with_our_weights(vit)
    image = pixels(batch=3, frames=1)[:, 0].double().requires_grad_(True)  # [B, H, W, 3] in [0, 1]
    ours = vit(image)
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in (TINY.pixel_mean, TINY.pixel_std))
    theirs = hf(pixel_values=((image - mean) / std).permute(0, 3, 1, 2)).last_hidden_state
    torch.testing.assert_close(ours.cls, theirs[:, 0])
    torch.testing.assert_close(ours.tokens, theirs[:, 1:])
    (ours_grad,) = torch.autograd.grad(ours.tokens.square().sum(), image)
    (theirs_grad,) = torch.autograd.grad(theirs[:, 1:].square().sum(), image)
    torch.testing.assert_close(ours_grad, theirs_grad)


def test_masked_forward_equals_encoding_only_the_visible_tokens():
    """Reference: embed every patch, then keep the unmasked ones (raster order) and run the blocks."""
    vit, x = tiny_vit().double(), pixels().double()
    out = vit(x, mask_ratio=0.5, mask_kind="frame", generator=torch.Generator().manual_seed(7))

    def reference(mask: torch.Tensor) -> torch.Tensor:
        tokens = vit.patch_embed(vit.patchify(x)) + vit.spatial_pos + vit.temporal_pos[:3, None]  # [B,T,S,D]
        visible = tokens[~mask].view(2, -1, 32)
        h = torch.cat([vit.cls_token.expand(2, -1, -1), visible], dim=1)
        for block in vit.blocks:
            h = block(h)
        return vit.norm(h)[:, 0]

    expected = reference(out.mask)
    torch.testing.assert_close(out.cls, expected)  # attention is blind to token order
    params = list(vit.parameters())
    grads = torch.autograd.grad(out.cls.square().sum(), params)
    ref_grads = torch.autograd.grad(expected.square().sum(), params)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, ref)
