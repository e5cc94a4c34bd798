"""Dual encoder: text masking (drop / replace) against a naive per-caption reference, pooling, building from a
tiny config or a local BERT folder, and save_pretrained / from_pretrained round trips."""

import math

import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN
from transformers.image_utils import OPENAI_CLIP_STD as CLIP_STD

from mmfactory.config import ConfigError
from mmfactory.models.components.vit import SpaceTimeViTConfig
from mmfactory.models.dual_encoder import (
    DualEncoderModel,
    DualEncoderSpec,
    TextEncoderSpec,
    load_dual_encoder,
    mask_text_tokens,
    tokenize_captions,
)

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
TINY_VISION = SpaceTimeViTConfig(image_size=16, patch_size=4, num_frames=2, hidden_size=32, num_layers=1)
CAPTIONS = [
    "A red star moves to the left.",
    "A cross.",
    "A blue circle appears and a green square stays still.",
]
BERT_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "red",
    "star",
    "moves",
    "to",
    "the",
    "left",
    ".",
]


def tiny_model(pooling: str = "cls", seed: int = 0):
    torch.manual_seed(seed)
    spec = DualEncoderSpec(vision=TINY_VISION, text=TextEncoderSpec(tiny=dict(TINY_BERT), pooling=pooling))
    model, tokenizer = load_dual_encoder(spec)
    return model.eval(), tokenizer


def padded_ids() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded sequences ``[CLS] ... [SEP]`` with 5 and 2 maskable tokens (ids 10.. are words)."""
    input_ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3], [2, 15, 16, 3, 0, 0, 0]])
    attention_mask = (input_ids != 0).long()
    maskable = attention_mask.bool() & (input_ids != 2) & (input_ids != 3)
    return input_ids, attention_mask, maskable


def test_drop_masking_removes_the_right_count_and_keeps_order_and_positions():
    input_ids, attention_mask, maskable = padded_ids()
    ids, mask, positions = mask_text_tokens(
        input_ids, attention_mask, maskable, 0.4, "drop", generator=torch.Generator().manual_seed(0)
    )
    assert mask.sum(1).tolist() == [7 - 2, 4 - 1]  # round(0.4 * 5) = 2 and round(0.4 * 2) = 1 dropped
    assert ids.shape == mask.shape == positions.shape == (2, 5)
    for row in range(2):
        kept = positions[row][mask[row].bool()]
        assert (kept.diff() > 0).all()  # original order
        assert torch.equal(ids[row][mask[row].bool()], input_ids[row, kept])  # original ids at those places
        assert kept[0] == 0 and input_ids[row, kept[-1]] == 3  # [CLS] and [SEP] are never dropped


def test_masks_differ_per_sequence_and_ratio_zero_changes_nothing():
    input_ids = torch.tensor([[2, *range(10, 30), 3]]).repeat(16, 1)
    attention_mask = torch.ones_like(input_ids)
    maskable = (input_ids >= 10) & (input_ids < 30)
    ids, _, _ = mask_text_tokens(input_ids, attention_mask, maskable, 0.5, "drop")
    assert len({tuple(row.tolist()) for row in ids}) == 16
    same, same_mask, _ = mask_text_tokens(input_ids, attention_mask, maskable, 0.0, "drop")
    assert torch.equal(same, input_ids) and torch.equal(same_mask, attention_mask)


def test_replace_masking_puts_mask_tokens_on_maskable_positions_only():
    input_ids, attention_mask, maskable = padded_ids()
    ids, mask, positions = mask_text_tokens(
        input_ids, attention_mask, maskable, 0.4, "replace", mask_token_id=4
    )
    assert positions is None and torch.equal(mask, attention_mask) and ids.shape == input_ids.shape
    assert (ids == 4).sum(1).tolist() == [2, 1]
    assert ((ids == 4) <= maskable).all()
    assert torch.equal(ids[ids != 4], input_ids[ids != 4])
    with pytest.raises(ValueError, match="mask_token_id"):
        mask_text_tokens(input_ids, attention_mask, maskable, 0.4, "replace")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_drop_masked_text_equals_encoding_each_shortened_caption_alone(pooling):
    model, tokenizer = tiny_model(pooling)
    model.double()
    batch = tokenize_captions(tokenizer, CAPTIONS, 32)
    ours = model.encode_text(
        **batch, mask_ratio=0.5, mask_mode="drop", generator=torch.Generator().manual_seed(1)
    )
    ids, mask, positions = mask_text_tokens(
        batch["input_ids"],
        batch["attention_mask"],
        ~batch["special_tokens_mask"].bool(),
        0.5,
        "drop",
        generator=torch.Generator().manual_seed(1),
    )
    reference = []
    for row in range(len(CAPTIONS)):  # no padding, no batching: the kept tokens at their original positions
        keep = mask[row].bool()
        hidden = model.text_model(input_ids=ids[row, keep][None], position_ids=positions[row, keep][None])
        states = hidden.last_hidden_state[0]
        reference.append(model.text_projection(states[0] if pooling == "cls" else states.mean(0)))
    reference = torch.stack(reference)
    torch.testing.assert_close(ours, reference)
    params = [p for p in model.text_model.parameters()] + [model.text_projection.weight]
    grads = torch.autograd.grad(ours.sin().sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(reference.sin().sum(), params, allow_unused=True)
    for ours_grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert (ours_grad is None) == (ref_grad is None)
        if ours_grad is not None:
            torch.testing.assert_close(ours_grad, ref_grad)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_a_caption_embedding(pooling):
    model, tokenizer = tiny_model(pooling)
    alone = model.encode_text(**{k: v for k, v in tokenize_captions(tokenizer, CAPTIONS[1:2], 32).items()})
    padded = model.encode_text(**tokenize_captions(tokenizer, CAPTIONS, 32))
    torch.testing.assert_close(padded[1:2], alone, rtol=1e-5, atol=1e-6)


def test_text_masking_needs_the_special_tokens_mask():
    model, tokenizer = tiny_model()
    batch = tokenize_captions(tokenizer, CAPTIONS, 32)
    with pytest.raises(ValueError, match="special_tokens_mask"):
        model.encode_text(batch["input_ids"], batch["attention_mask"], mask_ratio=0.15)


def test_world_tokenizer_gains_encoder_tokens_and_captions_are_wrapped():
    model, tokenizer = tiny_model()
    assert {tokenizer.cls_token, tokenizer.sep_token, tokenizer.mask_token} == {"[CLS]", "[SEP]", "[MASK]"}
    assert model.text_model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.mask_token_id == tokenizer.mask_token_id
    batch = tokenize_captions(tokenizer, CAPTIONS, 8)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == 8 and batch["input_ids"].shape == (3, 8)  # truncated to max_length
    for row, length in enumerate(lengths.tolist()):
        assert batch["input_ids"][row, 0] == tokenizer.cls_token_id
        assert batch["input_ids"][row, length - 1] == tokenizer.sep_token_id
        assert batch["special_tokens_mask"][row].nonzero().flatten().tolist() == [0, length - 1]
    assert model.log_logit_scale.item() == pytest.approx(math.log(20.0))  # temperature 0.05


def test_forward_shapes_and_video_masking():
    model, tokenizer = tiny_model()
    video = torch.randint(0, 256, (3, 2, 16, 16, 3), dtype=torch.uint8)
    out = model(
        video, **tokenize_captions(tokenizer, CAPTIONS, 32), video_mask_ratio=0.75, text_mask_ratio=0.15
    )
    assert out.video_embeds.shape == out.text_embeds.shape == (3, 64)
    full = model.encode_video(video)
    torch.testing.assert_close(model.encode_video(video), full, rtol=0, atol=0)  # no mask: deterministic
    assert not torch.allclose(out.video_embeds, full)


def test_save_and_load_round_trip(tmp_path):
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    video = torch.randint(0, 256, (3, 2, 16, 16, 3), dtype=torch.uint8)
    batch = tokenize_captions(tokenizer, CAPTIONS, 32)
    expected = model(video, **batch)
    for loaded in (
        DualEncoderModel.from_pretrained(tmp_path),
        AutoModel.from_pretrained(tmp_path),
        load_dual_encoder(DualEncoderSpec(), tmp_path)[0],
    ):
        out = loaded.eval()(video, **batch)
        torch.testing.assert_close(out.video_embeds, expected.video_embeds, rtol=0, atol=0)
        torch.testing.assert_close(out.text_embeds, expected.text_embeds, rtol=0, atol=0)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert torch.equal(tokenize_captions(reloaded, CAPTIONS, 32)["input_ids"], batch["input_ids"])


def test_local_bert_folder_keeps_its_weights_and_tokenizer(tmp_path):
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(BERT_VOCAB)})
    config = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    torch.manual_seed(5)
    bert = BertModel(BertConfig(vocab_size=len(BERT_VOCAB), **config))  # with its pooler
    bert.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    spec = DualEncoderSpec(vision=TINY_VISION, text=TextEncoderSpec(path=str(tmp_path), pooling="mean"))
    model, loaded_tokenizer = load_dual_encoder(spec)
    saved = bert.state_dict()
    text_state = model.text_model.state_dict()
    assert set(saved) - set(text_state) == {"pooler.dense.weight", "pooler.dense.bias"}
    for name, value in text_state.items():
        assert torch.equal(value, saved[name]), name
    ours = tokenize_captions(loaded_tokenizer, CAPTIONS[:1] + ["a red star ."], 6)
    theirs = loaded_tokenizer(CAPTIONS[:1] + ["a red star ."], padding=True, truncation=True, max_length=6)
    assert ours["input_ids"].tolist() == theirs["input_ids"]
    assert ours["attention_mask"].tolist() == theirs["attention_mask"]


def _tiny_clip_folder(path, hidden_act="quick_gelu"):
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        hidden_act=hidden_act,
    )
    torch.manual_seed(3)
    tower = CLIPVisionModel(config)
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))  # not the identity norms of a fresh init
    tower.save_pretrained(path)
    return tower


def test_video_encoder_starts_from_a_clip_image_tower_exactly(tmp_path):
    tower = _tiny_clip_folder(tmp_path / "clip").eval()
    spec = DualEncoderSpec(
        vision=SpaceTimeViTConfig(num_frames=3), text=TextEncoderSpec(tiny=TINY_BERT), vision_init="unused"
    )
    model, _ = load_dual_encoder(spec, vision_init=tmp_path / "clip")
    vit = model.vision_model.eval()
    assert vit.config.hidden_size == 32 and vit.config.pre_norm and vit.config.hidden_act == "quick_gelu"
    image = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    pixel_values = ((image.float() / 255 - mean) / std).permute(0, 3, 1, 2)
    expected = tower(pixel_values=pixel_values).pooler_output  # post_layernorm(CLS)
    torch.testing.assert_close(vit(image).cls, expected, rtol=1e-5, atol=1e-5)
    still = image[:, None].expand(-1, 3, -1, -1, -1)  # a still 3-frame clip: temporal embeddings start at 0
    assert torch.equal(vit.temporal_pos, torch.zeros(3, 32))
    with pytest.raises(ConfigError, match="model.vision.hidden_size: 48, but the vision_init tower"):
        bad = DualEncoderSpec(vision=SpaceTimeViTConfig(hidden_size=48), text=TextEncoderSpec(tiny=TINY_BERT))
        load_dual_encoder(bad, vision_init=tmp_path / "clip")
    assert vit(still).cls.shape == (2, 32)


def test_the_temperature_is_fixed_unless_asked_to_learn(tmp_path):
    fixed, _ = load_dual_encoder(DualEncoderSpec(vision=TINY_VISION, text=TextEncoderSpec(tiny=TINY_BERT)))
    assert not fixed.log_logit_scale.requires_grad and fixed.log_logit_scale.item() == pytest.approx(
        math.log(20)
    )
    fixed.save_pretrained(tmp_path)
    assert not DualEncoderModel.from_pretrained(tmp_path).log_logit_scale.requires_grad
    learned, _ = load_dual_encoder(
        DualEncoderSpec(vision=TINY_VISION, text=TextEncoderSpec(tiny=TINY_BERT), learn_logit_scale=True)
    )
    assert learned.log_logit_scale.requires_grad
