"""ARM vision Mamba: cluster order, targets, block-causal decoding, masking, multi-scan init, saving."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmfactory.config import ConfigError
from mmfactory.models.vision_mamba import (
    ARMPretrainingModel,
    CrossAttention,
    DropPath,
    MaskedPretrainingModel,
    PixelDecoder,
    PixelDecoderConfig,
    VisionMamba,
    VisionMambaClassifier,
    VisionMambaConfig,
    _from_scan,
    _to_scan,
    block_causal_mask,
    cluster_order,
    drop_path_rates,
    interpolate_positions,
    load_encoder,
    load_pretrained_encoder,
    normalize_patches,
    patchify,
    random_split,
    sincos_2d_positions,
)

# 16x16 images, 4x4 patches of 4 px, clusters of 2x2 patches: K = 4 clusters of S = 4 patches.
ENCODER = dict(hidden_size=32, num_layers=3, image_size=16, patch_size=4)
DECODER = dict(hidden_size=16, num_layers=2, num_heads=2)


def encoder_config(**overrides) -> VisionMambaConfig:
    return VisionMambaConfig(**{**ENCODER, **overrides})


def images(batch: int = 2, seed: int = 0, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 16, 16, channels), dtype=torch.uint8, generator=generator)


def arm_model(seed: int = 0) -> ARMPretrainingModel:
    torch.manual_seed(seed)
    return ARMPretrainingModel(encoder_config(), PixelDecoderConfig(**DECODER), cluster_size=2).eval()


# -- layout: cluster order, patches, targets, positions ------------------------------------------------


@pytest.mark.parametrize(("grid", "cluster"), [(6, 2), (12, 4), (4, 1), (4, 4)])
def test_cluster_order_matches_naive_loops(grid, cluster):
    naive = [
        (cr * cluster + r) * grid + cc * cluster + c
        for cr in range(grid // cluster)
        for cc in range(grid // cluster)
        for r in range(cluster)
        for c in range(cluster)
    ]
    assert cluster_order(grid, cluster).tolist() == naive
    with pytest.raises(ValueError, match="does not split"):
        cluster_order(6, 4)


def test_patchify_and_per_patch_normalised_targets_match_naive():
    pixels = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    patches = patchify(pixels, 4)  # [2, 6, 48]
    targets = normalize_patches(patches)
    for b in range(2):
        for index in range(6):
            row, col = divmod(index, 3)
            patch = pixels[b, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]  # [C, 4, 4]
            flat = [patch[c, i, j].item() for i in range(4) for j in range(4) for c in range(3)]
            assert patches[b, index].tolist() == flat
            mean = sum(flat) / 48
            var = sum((x - mean) ** 2 for x in flat) / 47  # unbiased, as MAE's torch.var
            expected = torch.tensor([(x - mean) / math.sqrt(var + 1e-6) for x in flat], dtype=torch.float64)
            torch.testing.assert_close(targets[b, index], expected)


def test_sincos_positions_encode_column_then_row():
    table = sincos_2d_positions(8, 3)  # [9, 8]: columns in channels 0-3, rows in 4-7
    assert table.shape == (9, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    torch.testing.assert_close(
        table[4, :4], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)])
    )
    assert torch.equal(table[1, 4:], table[0, 4:]) and torch.equal(table[3, :4], table[0, :4])


def test_config_sizes_and_decoder_layers():
    base = VisionMambaConfig(size="base")
    base.validate()
    assert (base.hidden_size, base.num_layers, base.image_size, base.patch_size) == (768, 12, 192, 16)
    assert PixelDecoderConfig().feature_layers(12) == [6, 8, 10, 12]
    assert PixelDecoderConfig().feature_layers(24) == [12, 16, 20, 24]
    with pytest.raises(ConfigError, match="size 'base' means 768"):
        VisionMambaConfig(size="base", hidden_size=512).validate()
    with pytest.raises(ConfigError, match="set size, or both"):
        VisionMambaConfig(hidden_size=64).validate()
    with pytest.raises(ConfigError, match="must lie in 1..3"):
        PixelDecoderConfig(encoder_layers=[2, 4]).feature_layers(3)


def test_encoder_block_and_mixer_sizes_follow_the_paper():
    encoder = VisionMamba(encoder_config(hidden_size=48))
    block = encoder.blocks[0]
    assert (
        block.mixer.d_inner == 48 and block.mixer.d_state == 16 and block.mixer.dt_rank == 3
    )  # ceil(48 / 16)
    assert block.mixer.conv1d.kernel_size == (4,)
    assert block.mlp.w1.out_features == 48 * 4 * 2 // 3
    hidden = encoder(torch.randn(2, 5, 48), [1, 3, 3])
    assert [h.shape for h in hidden] == [(2, 5, 48)] * 3 and torch.equal(hidden[1], hidden[2])


# -- block-causal decoding ---------------------------------------------------------------------------


def test_block_causal_mask_equals_hand_built():
    allowed = [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ]
    assert torch.equal(block_causal_mask(3, 2), torch.tensor(allowed, dtype=torch.bool))
    model = arm_model()
    assert model.mask.shape == (12, 12) and torch.equal(model.mask, block_causal_mask(3, 4))


def _perturb_cluster(image: torch.Tensor, model: ARMPretrainingModel, cluster: int) -> torch.Tensor:
    """A copy of uint8 ``[B, H, W, C]`` whose pixels in cluster ``cluster`` (0-based) are redrawn."""
    p, grid = model.encoder.config.patch_size, model.encoder.config.grid_size
    out = image.clone()
    for index in model.order[cluster * model.cluster_len : (cluster + 1) * model.cluster_len].tolist():
        row, col = divmod(index, grid)
        out[:, row * p : (row + 1) * p, col * p : (col + 1) * p] = torch.randint(
            0, 256, (p, p, 3), dtype=torch.uint8
        )
    return out


@pytest.mark.parametrize("cluster", [1, 2])
def test_arm_prediction_of_cluster_k_plus_1_ignores_clusters_after_k(cluster):
    """Redrawing the pixels of (0-based) cluster ``c`` leaves the predictions of clusters ``1..c`` alone
    (they read clusters ``0..c-1``) and changes the one of cluster ``c + 1``; without the block-causal mask,
    the earlier predictions change too."""
    torch.manual_seed(1)
    model, s = arm_model(), 4
    x = images()
    x_new = _perturb_cluster(x, model, cluster)
    with torch.no_grad():
        pred, _ = model(x)
        pred_new, _ = model(x_new)
        # predictions row r is for cluster r // s + 1: clusters 1..c are rows [0, c * s)
        torch.testing.assert_close(pred_new[:, : cluster * s], pred[:, : cluster * s], rtol=0, atol=0)
        assert not torch.allclose(
            pred_new[:, cluster * s : (cluster + 1) * s], pred[:, cluster * s : (cluster + 1) * s]
        )
        model.mask.fill_(True)
        leaky, leaky_new = model(x)[0], model(x_new)[0]
        assert not torch.allclose(leaky_new[:, : cluster * s], leaky[:, : cluster * s])


def test_arm_targets_are_clusters_two_to_k_in_cluster_order():
    model = arm_model()
    x = images()
    _, target = model(x)
    pixels = model.encoder.normalize(x)
    expected = normalize_patches(patchify(pixels, 4))[:, cluster_order(4, 2)[4:]]
    torch.testing.assert_close(target, expected)
    assert target.shape == (2, 12, 48)


def test_decoder_mask_blocks_later_key_clusters():
    torch.manual_seed(0)
    decoder = PixelDecoder(PixelDecoderConfig(**DECODER, encoder_layers=[1, 3]), encoder_config())
    features = [torch.randn(2, 6, 32) for _ in range(2)]
    targets, mask = torch.arange(6), block_causal_mask(3, 2)
    changed = [f.clone() for f in features]
    for f in changed:
        f[:, 4:] += 1.0  # key cluster 2
    out, out_changed = decoder(features, targets, mask), decoder(changed, targets, mask)
    torch.testing.assert_close(out_changed[:, :4], out[:, :4], rtol=0, atol=0)
    assert not torch.allclose(out_changed[:, 4:], out[:, 4:])


def test_cross_attention_matches_naive_forward_and_grad():
    torch.manual_seed(0)
    attn = CrossAttention(8, num_heads=2)
    q, kv = torch.randn(2, 6, 8, requires_grad=True), torch.randn(2, 6, 8, requires_grad=True)
    mask = block_causal_mask(3, 2)

    def naive(q, kv):
        heads = []
        qs, (ks, vs) = attn.q(q), attn.kv(kv).chunk(2, dim=-1)
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            scores = qs[..., sl] @ ks[..., sl].transpose(1, 2) / 2.0
            heads.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vs[..., sl])
        return attn.proj(torch.cat(heads, dim=-1))

    weights = torch.randn(2, 6, 8)
    out, ref = attn(q, kv, mask), naive(q, kv)
    torch.testing.assert_close(out, ref)
    params = [q, kv, *attn.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), params)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad)


# -- masked pretraining --------------------------------------------------------------------------------


def test_random_split_partitions_positions_in_raster_order():
    visible, masked = random_split(3, 16, 4, torch.Generator().manual_seed(0))
    assert visible.shape == (3, 4) and masked.shape == (3, 12)
    for v, m in zip(visible, masked, strict=True):
        assert sorted(v.tolist() + m.tolist()) == list(range(16))
        assert v.tolist() == sorted(v.tolist()) and m.tolist() == sorted(m.tolist())
    assert len({tuple(v.tolist()) for v in visible}) > 1  # one mask per sample


def test_mae_sees_only_visible_patches_and_predicts_the_masked_ones():
    torch.manual_seed(0)
    model = MaskedPretrainingModel(encoder_config(), PixelDecoderConfig(**DECODER), mask_ratio=0.75).eval()
    x = images(batch=1)
    visible, masked = random_split(1, 16, 4, torch.Generator().manual_seed(3))
    x_new = x.clone()
    for index in masked[0].tolist():  # redraw every masked patch
        row, col = divmod(index, 4)
        x_new[:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = (
            255 - x_new[:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
        )
    with torch.no_grad():
        pred, target = model(x, torch.Generator().manual_seed(3))
        pred_new, target_new = model(x_new, torch.Generator().manual_seed(3))
    assert pred.shape == target.shape == (1, 12, 48)
    torch.testing.assert_close(pred_new, pred, rtol=0, atol=0)
    expected = normalize_patches(patchify(model.encoder.normalize(x), 4))[:, masked[0]]
    torch.testing.assert_close(target, expected)
    assert not torch.allclose(target_new, target)


# -- fine-tuning: multi-scan init, checkpoints -----------------------------------------------------------


def test_multi_scan_encoder_loaded_from_unidirectional_weights():
    """Every scan starts as the pretrained forward mixer: a block's mixer output is the mean of that mixer
    over the raster sequence, its reverse, and the column-major sequence and its reverse."""
    torch.manual_seed(0)
    pretrained = arm_model()
    classifier = VisionMambaClassifier(
        encoder_config(), 3, ["forward", "backward", "column", "column_backward"]
    )
    load_encoder(classifier.encoder, pretrained.state_dict())
    uni_block, block = pretrained.encoder.blocks[1], classifier.encoder.blocks[1]
    for name, value in uni_block.state_dict().items():
        assert torch.equal(block.state_dict()[name], value), name
    x = torch.randn(2, 16, 32)
    mixer = uni_block.mixer

    def column(t):  # raster [B, 16, D] <-> column-major (a transpose, its own inverse)
        return t.view(2, 4, 4, 32).transpose(1, 2).reshape(2, 16, 32)

    expected = (
        mixer(x)
        + mixer(x.flip(1)).flip(1)
        + column(mixer(column(x)))
        + column(mixer(column(x).flip(1)).flip(1))
    ) / 4
    torch.testing.assert_close(block.mix(x), expected)
    torch.testing.assert_close(block.mixer(x), mixer(x))  # the forward direction is the pretrained one
    bidirectional = VisionMambaClassifier(encoder_config(), 3, ["forward", "backward"])
    load_encoder(bidirectional.encoder, pretrained.state_dict())
    torch.testing.assert_close(
        bidirectional.encoder.blocks[1].mix(x), (mixer(x) + mixer(x.flip(1)).flip(1)) / 2
    )
    with pytest.raises(ValueError, match="no encoder"):
        load_encoder(bidirectional.encoder, {"decoder.norm.weight": torch.ones(3)})


def test_scans_must_start_forward_and_multi_scan_needs_the_full_grid():
    with pytest.raises(ConfigError, match="must start with 'forward'"):
        VisionMamba(encoder_config(), ["backward"])
    encoder = VisionMamba(encoder_config(), ["forward", "column"])
    with pytest.raises(ValueError, match="full 4x4 raster grid"):
        encoder(torch.randn(1, 12, 32))


def test_save_pretrained_round_trips(tmp_path):
    torch.manual_seed(0)
    classifier = VisionMambaClassifier(
        encoder_config(in_channels=1, pixel_mean=[0.5], pixel_std=[0.25]),
        4,
        ["forward", "backward"],
        list("abcd"),
    )
    arm = arm_model()
    x = images(channels=1)
    for model, path in ((classifier, tmp_path / "cls"), (arm, tmp_path / "arm")):
        model.save_pretrained(path)
        assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = VisionMambaClassifier.from_pretrained(tmp_path / "cls").eval()
    assert loaded.class_names == list("abcd") and loaded.encoder.scans == ("forward", "backward")
    torch.testing.assert_close(loaded(x), classifier.eval()(x), rtol=0, atol=0)
    loaded_arm = ARMPretrainingModel.from_pretrained(tmp_path / "arm")
    torch.testing.assert_close(loaded_arm(images())[0], arm(images())[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds a 'mmfactory_arm_pretraining' model"):
        VisionMambaClassifier.from_pretrained(tmp_path / "arm")


def test_layer_ids_for_layer_wise_decay():
    model = VisionMambaClassifier(encoder_config(), 3)
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["encoder.patch_embed.weight"] == 0
    assert ids["encoder.blocks.0.mixer.A_log"] == 1 and ids["encoder.blocks.2.mlp.w3.weight"] == 3
    assert ids["norm.weight"] == ids["head.bias"] == 4
    assert ids["cls_token"] == ids["pos_embed"] == 0  # as the official get_layer_id_for_vit


def _official_classifier_forward(model: VisionMambaClassifier, x: torch.Tensor) -> torch.Tensor:
    """The official fine-tuning forward, written out: patch tokens, the class token inserted at N // 2, the
    learned positions, the blocks, the final norm, the class token's state (or the mean of the two halves)."""
    enc = model.encoder
    tokens = enc.patch_embed(enc.normalize(x)).flatten(2).transpose(1, 2)
    n = tokens.shape[1]
    c = n // 2
    seq = (
        torch.cat([tokens[:, :c], model.cls_token.expand(len(x), -1, -1), tokens[:, c:]], 1) + model.pos_embed
    )
    for block in enc.blocks:
        seq = block(seq, c)
    seq = F.layer_norm(seq, (32,), model.norm.weight, model.norm.bias)
    pooled = seq[:, c] if model.pooling == "cls" else (seq[:, :c].mean(1) + seq[:, c + 1 :].mean(1)) / 2
    return F.linear(pooled, model.head.weight, model.head.bias)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_reads_the_middle_class_token_as_the_official_model(pooling):
    torch.manual_seed(0)
    model = VisionMambaClassifier(encoder_config(), 5, pooling=pooling).eval()
    x = images()
    assert model.cls_position == 8 and model.pos_embed.shape == (17, 32)
    torch.testing.assert_close(model(x), _official_classifier_forward(model, x))
    # The class token sits in the middle: with the causal forward scan, the 8 patch states before it do not
    # depend on it, and the states from it on do.
    seen = {}
    model.encoder.blocks[-1].register_forward_hook(lambda m, a, out: seen.update(h=out))
    model(x)
    before = seen["h"]
    with torch.no_grad():
        model.cls_token.add_(1.0)
    model(x)
    assert torch.equal(seen["h"][:, :8], before[:, :8]) and not torch.allclose(
        seen["h"][:, 8:], before[:, 8:]
    )
    with pytest.raises(ValueError, match=r"expected \[B, 16, 16, 3\] images"):
        model(images(channels=1))


def test_column_scans_keep_the_class_token_in_place():
    x = torch.arange(2 * 17 * 1.0).view(2, 17, 1)  # 4x4 grid + a class token at 8
    for scan in ("column", "column_backward", "backward"):
        scanned = _to_scan(x, scan, 4, 8)
        assert torch.equal(_from_scan(scanned, scan, 4, 8), x)
    column = _to_scan(x, "column", 4, 8)[0, :, 0].tolist()
    assert column[8] == 8.0  # still the class token
    patches = [int(v) - (int(v) > 8) for v in column[:8] + column[9:]]  # raster patch indices
    assert patches == [r * 4 + c for c in range(4) for r in range(4)]
    torch.manual_seed(0)
    four = VisionMambaClassifier(encoder_config(), 3, ["forward", "backward", "column", "column_backward"])
    torch.testing.assert_close(four.eval()(images()), _official_classifier_forward(four, images()))


def test_positions_start_from_the_pretraining_table_interpolated_to_the_new_grid():
    table = sincos_2d_positions(32, 4)  # the 16 px pretraining encoder's
    torch.manual_seed(0)
    same = VisionMambaClassifier(encoder_config(), 3)
    load_pretrained_encoder(same, arm_model().state_dict(), encoder_config())
    assert torch.equal(same.patch_positions(), table) and torch.equal(same.pos_embed[8], torch.zeros(32))
    assert torch.equal(interpolate_positions(table, 4), table)
    larger = VisionMambaClassifier(encoder_config(image_size=24), 3)  # 6x6 patches
    load_pretrained_encoder(larger, arm_model().state_dict(), encoder_config())
    grid = table.T.reshape(1, 32, 4, 4)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).reshape(32, 36).T
    assert larger.pos_embed.shape == (37, 32) and torch.equal(larger.pos_embed[18], torch.zeros(32))
    torch.testing.assert_close(larger.patch_positions(), expected)
    assert torch.equal(larger.encoder.patch_embed.weight, arm_model().encoder.patch_embed.weight)
    assert larger.head.weight.std() < 1e-4  # re-initialised at std 2e-5, as the official fine-tuning
    # A fine-tuned classifier passes its own (learned) positions and class token on.
    with torch.no_grad():
        larger.pos_embed.add_(torch.randn_like(larger.pos_embed))
    again = VisionMambaClassifier(encoder_config(image_size=24), 3)
    load_pretrained_encoder(again, larger.state_dict(), encoder_config(image_size=24))
    assert torch.equal(again.patch_positions(), larger.patch_positions())
    assert torch.equal(again.cls_token, larger.cls_token)


def test_drop_path_rates_follow_the_official_schedule_and_are_identity_in_eval():
    assert drop_path_rates(0.1, 4) == pytest.approx([0.0, 0.0, 0.1 / 3, 0.2 / 3])
    layer = DropPath(0.5)
    x = torch.randn(400, 3, 2)
    assert torch.equal(layer.eval()(x), x)
    out = layer.train()(x)
    kept = (out != 0).flatten(1).all(1)
    assert ((out == 0).flatten(1).all(1) | kept).all()  # whole samples dropped or kept
    torch.testing.assert_close(out[kept], 2 * x[kept])
    assert 0.4 < kept.float().mean() < 0.6
    torch.manual_seed(0)
    model = VisionMambaClassifier(encoder_config(), 3, drop_path=0.5)
    assert [b.drop_path.rate for b in model.encoder.blocks] == pytest.approx([0.0, 0.0, 0.25])
    x = images()
    plain = VisionMambaClassifier(encoder_config(), 3, drop_path=0.0)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)  # the identity in eval
    train_out = [model.train()(x) for _ in range(6)]
    assert any(not torch.equal(train_out[0], o) for o in train_out[1:])


@pytest.mark.parametrize("channels", [3, 1])
def test_reconstruct_inverts_the_targets_exactly_and_keeps_the_first_cluster(monkeypatch, channels):
    """A decoder that predicted its targets exactly draws the image back; the first cluster is the input's
    whatever the decoder says."""
    stats = {"pixel_mean": [0.5] * channels, "pixel_std": [0.25] * channels}
    encoder = encoder_config(in_channels=channels, **stats)
    model = ARMPretrainingModel(encoder, PixelDecoderConfig(**DECODER), cluster_size=2).eval()
    x = images(channels=channels)
    assert model.reconstruct(x).shape == x.shape and model.reconstruct(x).dtype == torch.uint8
    perfect = ARMPretrainingModel.forward(model, x)[1]
    monkeypatch.setattr(model, "forward", lambda images: (perfect, perfect))
    assert (model.reconstruct(x).int() - x.int()).abs().max() <= 1  # float round trip of uint8 pixels
    monkeypatch.setattr(model, "forward", lambda images: (torch.zeros_like(perfect), perfect))
    drawn = model.reconstruct(x)
    assert torch.equal(drawn[:, :8, :8], x[:, :8, :8])  # cluster 1: the top-left 2x2 patches of 4 px
    assert not torch.equal(drawn[:, 8:, 8:], x[:, 8:, 8:])
