"""MultimodalLM: placeholder merge vs a naive reference, clear mismatch errors, projector parity with
transformers' LLaVA projector, save/load, LLaVA export parity (model and processor), real-checkpoint
folders (full CLIP + Qwen2 with a tokenizer lacking the placeholder), SigLIP towers, batched generation."""

import json

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmfactory.data.multimodal import MultimodalProcessor
from mmfactory.models.components.projector import build_projector
from mmfactory.models.lm import CausalLMConfig
from mmfactory.models.mllm import (
    MultimodalLM,
    MultimodalLMSpec,
    PlaceholderMismatchError,
    build_multimodal_lm,
    export_llava,
    merge_modal_embeddings,
)
from mmfactory.models.vision import VisionTowerConfig
from mmfactory.world import World, world_tokenizer
from tests.helpers import TINY_LM

# 16x16 images in 8x8 patches: 4 visual tokens per image (CLS dropped).
TINY_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 8,
}


def tiny_mllm(seed: int = 0, vision: dict | None = None, **spec):
    set_seed(seed)
    return build_multimodal_lm(
        MultimodalLMSpec(
            vision=VisionTowerConfig(tiny=vision or TINY_VISION),
            lm=CausalLMConfig(tiny=dict(TINY_LM)),
            **spec,
        )
    )


def image_batch(model: MultimodalLM, rows: list[list[int]], seed: int = 0):
    """``rows`` of text ids with ``-1`` standing for one image: ids [B, T] (right-padded), mask, pixels."""
    cfg = model.config
    ids = [
        [t for x in row for t in ([cfg.image_token_id] * cfg.num_image_tokens if x == -1 else [x])]
        for row in rows
    ]
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    size = cfg.vision_config.image_size
    pixels = torch.randn(
        sum(row.count(-1) for row in rows), 3, size, size, generator=torch.Generator().manual_seed(seed)
    )
    return input_ids, mask, pixels


# -- the merge ---------------------------------------------------------------------------------------


def naive_merge(embeds, input_ids, token_id, items):
    """Walk the batch in reading order, writing the next item vector at each placeholder."""
    vectors = [v for item in items for v in item]
    out, k = [], 0
    for b in range(embeds.shape[0]):
        row = []
        for t in range(embeds.shape[1]):
            if input_ids[b, t] == token_id:
                row.append(vectors[k])
                k += 1
            else:
                row.append(embeds[b, t])
        out.append(torch.stack(row))
    return torch.stack(out)


def test_merge_matches_naive_reference_in_forward_and_gradient():
    gen = torch.Generator().manual_seed(0)
    # sample 0: one item of 2 placeholders; sample 1: two items (one at the very end).
    input_ids = torch.tensor([[1, 9, 9, 2, 3, 0, 0], [9, 9, 4, 5, 6, 9, 9]])
    embeds = torch.randn(2, 7, 4, generator=gen, requires_grad=True)
    features = torch.randn(3, 2, 4, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 7, 4, generator=gen)

    merged = merge_modal_embeddings(embeds, input_ids, {9: features})
    reference = naive_merge(embeds, input_ids, 9, features)
    torch.testing.assert_close(merged, reference, rtol=0, atol=0)
    grads = torch.autograd.grad((merged * upstream).sum(), (embeds, features))
    ref_grads = torch.autograd.grad((reference * upstream).sum(), (embeds, features))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert grads[0][input_ids == 9].abs().sum() == 0  # placeholder embeddings get no gradient


def test_merge_fills_variable_length_items_of_two_modalities():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.tensor([[7, 7, 7, 1, 8, 8], [8, 8, 8, 8, 7, 2]])
    embeds = torch.randn(2, 6, 3, generator=gen)
    images = [torch.randn(3, 3, generator=gen), torch.randn(1, 3, generator=gen)]
    audio = [torch.randn(2, 3, generator=gen), torch.randn(4, 3, generator=gen)]
    merged = merge_modal_embeddings(embeds, input_ids, {7: images, 8: audio})
    expected = naive_merge(naive_merge(embeds, input_ids, 7, images), input_ids, 8, audio)
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)


def test_merge_errors_name_the_counts_and_the_sample():
    embeds = torch.zeros(2, 6, 3)
    features = torch.zeros(2, 2, 3)
    with pytest.raises(PlaceholderMismatchError) as info:  # one placeholder too few in sample 1
        merge_modal_embeddings(
            embeds, torch.tensor([[5, 5, 1, 1, 1, 1], [1, 5, 1, 1, 1, 1]]), {5: features}, {5: "<image>"}
        )
    message = str(info.value)
    assert "the batch has 3 placeholder tokens (per sample: [2, 1])" in message
    assert "2 items x 2 tokens = 4 feature vectors" in message and "sample 1 holds 1 of them" in message
    with pytest.raises(
        PlaceholderMismatchError,
        match=r"4 placeholder tokens \(per sample: \[3, 1\]\) .* sample 0 holds 3 of them",
    ):
        merge_modal_embeddings(embeds, torch.tensor([[5, 5, 5, 1, 1, 1], [1, 5, 1, 1, 1, 1]]), {5: features})
    with pytest.raises(
        PlaceholderMismatchError, match=r"6 placeholder tokens .* features run out in sample 1"
    ):
        merge_modal_embeddings(embeds, torch.tensor([[5, 5, 1, 1, 1, 1], [5, 5, 5, 5, 1, 1]]), {5: features})
    with pytest.raises(PlaceholderMismatchError, match="2 placeholder tokens .* for no items"):
        merge_modal_embeddings(embeds, torch.tensor([[5, 5, 1, 1, 1, 1], [1] * 6]), {5: []})


def test_model_refuses_a_truncated_image_span():
    model, _, _ = tiny_mllm()
    input_ids, mask, pixels = image_batch(model, [[11, -1, 12], [-1, 13, 14]])
    input_ids[1, 0] = 11  # sample 1 loses one of its 4 placeholders
    with pytest.raises(
        PlaceholderMismatchError, match=r"<image> .* \(per sample: \[4, 3\]\) for 2 items x 4 tokens"
    ):
        model(input_ids, pixels, mask)
    with pytest.raises(PlaceholderMismatchError, match="for no items"):
        model(input_ids, None, mask)


# -- parts -----------------------------------------------------------------------------------------


def test_mlp2x_gelu_projector_equals_transformers_llava_projector():
    torch.manual_seed(0)
    ours = build_projector("mlp2x_gelu", 8, 12)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 8, "num_attention_heads": 2},
        text_config={
            "model_type": "qwen2",
            "hidden_size": 12,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        },
    )
    theirs = LlavaMultiModalProjector(config)
    theirs.load_state_dict(
        {
            "linear_1.weight": ours[0].weight,
            "linear_1.bias": ours[0].bias,
            "linear_2.weight": ours[2].weight,
            "linear_2.bias": ours[2].bias,
        }
    )
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert [type(m).__name__ for m in build_projector("mlp3x_gelu", 8, 12)] == [
        "Linear",
        "GELU",
        "Linear",
        "GELU",
        "Linear",
    ]
    assert len(build_projector("linear", 8, 12)) == 1
    with pytest.raises(ValueError, match="unknown projector_type 'mlp2x_relu'"):
        build_projector("mlp2x_relu", 8, 12)


def test_save_and_load_give_the_same_logits(tmp_path):
    model, _, _ = tiny_mllm()
    input_ids, mask, pixels = image_batch(model, [[1, -1, 5, 6], [-1, 7]])
    logits = model(input_ids, pixels, mask).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    for loaded in (MultimodalLM.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is MultimodalLM
        torch.testing.assert_close(loaded(input_ids, pixels, mask).logits, logits, rtol=0, atol=0)


def test_siglip_tower_has_no_cls_to_drop():
    siglip = {**TINY_VISION, "model_type": "siglip_vision_model"}
    model, _, _ = tiny_mllm(vision=siglip)
    assert model.config.num_image_tokens == 4 and not model.config.drops_cls
    clip_full, _, _ = tiny_mllm(vision_feature_select="full")
    assert clip_full.config.num_image_tokens == 5
    assert clip_full.encode_images(torch.zeros(3, 3, 16, 16)).shape == (3, 5, 32)
    assert model.encode_images(torch.zeros(3, 3, 16, 16)).shape == (3, 4, 32)


def test_real_checkpoint_folders_load_through_the_same_path(tmp_path):
    """A full CLIP checkpoint (with its image processor) and a Qwen2 folder whose tokenizer lacks the
    placeholder token, as LLaVA's real parts would be."""
    set_seed(0)
    vision = {k: v for k, v in TINY_VISION.items() if k != "model_type"}
    text = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 99,
    }
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(tmp_path / "clip")
    tokenizer = world_tokenizer()
    lm, _ = tiny_mllm()[0].language_model, None
    lm.save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")

    spec = MultimodalLMSpec(
        vision=VisionTowerConfig(path=str(tmp_path / "clip")),
        lm=CausalLMConfig(path=str(tmp_path / "qwen2")),
        image_token="<im_patch>",  # not in the tokenizer: added and the embeddings grow
    )
    model, tok, image_processor = build_multimodal_lm(spec)
    assert model.config.image_token_id == len(tokenizer) == len(tok) - 1
    assert model.language_model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.text_config.vocab_size == len(tok)
    torch.testing.assert_close(
        model.vision_tower.state_dict()["encoder.layers.1.mlp.fc1.weight"],
        clip.vision_model.encoder.layers[1].mlp.fc1.weight,
    )
    saved_lm = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2")
    torch.testing.assert_close(
        model.language_model.model.layers[0].mlp.up_proj.weight, saved_lm.model.layers[0].mlp.up_proj.weight
    )
    assert list(image_processor.image_mean) == [0.5] * 3  # the checkpoint's own processor

    input_ids, mask, pixels = image_batch(model, [[1, -1, 2]])
    logits = model(input_ids, pixels, mask).logits
    model.save_pretrained(tmp_path / "mllm")
    torch.testing.assert_close(
        MultimodalLM.from_pretrained(tmp_path / "mllm")(input_ids, pixels, mask).logits, logits
    )


# -- export ----------------------------------------------------------------------------------------


def test_llava_export_has_equal_logits_and_an_equivalent_processor(tmp_path):
    model, tokenizer, image_processor = tiny_mllm()
    with torch.no_grad():  # a trained-looking projector, not HF's near-zero init
        for p in model.projector.parameters():
            p.normal_(std=0.5)
    processor = MultimodalProcessor(tokenizer, image_processor, model.config.num_image_tokens)
    export_llava(model, processor, tmp_path)
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert llava.config.vision_feature_select_strategy == "default"

    input_ids, mask, pixels = image_batch(model, [[1, -1, 5, 6], [-1, 7]])
    with torch.no_grad():
        ours = model(input_ids, pixels, mask).logits
        theirs = llava(input_ids=input_ids, pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # The exported processor turns a chat message + image into the same ids and pixels as ours.
    hf = AutoProcessor.from_pretrained(tmp_path)
    image = World().vqa("test", 1)[0]["image"]
    question = "What color is the star?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = hf(images=[image], text=[text], return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == processor.prompt(
        [{"role": "user", "content": f"<image>\n{question}"}]
    )
    torch.testing.assert_close(encoded["pixel_values"], processor.pixel_values([image]))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    # generation (and lmms-eval, which stops at the tokenizer's EOS) ends at the trained end of turn
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert hf.tokenizer.eos_token == "<|im_end|>" and llava.generation_config.eos_token_id == end_id
    assert processor.tokenizer.eos_token != "<|im_end|>"  # the caller's processor is left as it was


def test_export_refuses_a_projector_llava_cannot_hold(tmp_path):
    model, tokenizer, image_processor = tiny_mllm(projector_type="linear")
    processor = MultimodalProcessor(tokenizer, image_processor, model.config.num_image_tokens)
    with pytest.raises(ValueError, match="LLaVA's projector is mlp2x_gelu"):
        export_llava(model, processor, tmp_path)


# -- generation --------------------------------------------------------------------------------------


def test_left_padded_batched_generation_equals_one_by_one():
    model, _, _ = tiny_mllm(seed=3)
    model.eval()
    image_id, p = model.config.image_token_id, model.config.num_image_tokens
    prompts = [[1, 20] + [image_id] * p + [30, 31, 32, 33], [image_id] * p + [40]]
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(q)) + q for q in prompts])
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    batched = model.generate(input_ids, mask, pixels, **kwargs)
    for i, q in enumerate(prompts):
        single = model.generate(
            torch.tensor([q]), torch.ones(1, len(q), dtype=torch.long), pixels[i : i + 1], **kwargs
        )
        assert batched[i].tolist() == single[0].tolist()
    assert np.unique(batched.numpy()).size > 1  # not a degenerate constant output


def test_export_command_writes_llava_hf_from_a_stage_folder(tmp_path, capsys):
    from mmfactory.cli import main

    model, tokenizer, image_processor = tiny_mllm()
    with torch.no_grad():
        for p in model.projector.parameters():
            p.normal_(std=0.5)
    processor = MultimodalProcessor(tokenizer, image_processor, model.config.num_image_tokens)
    stage = tmp_path / "run" / "instruct"
    model.save_pretrained(stage / "final")
    processor.save_pretrained(stage / "final")
    assert main(["export", str(stage), "--to", "llava-hf", "--out", str(tmp_path / "hf")]) == 0
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    input_ids, mask, pixels = image_batch(model, [[1, -1, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(
            llava(input_ids=input_ids, pixel_values=pixels, attention_mask=mask).logits,
            model(input_ids, pixels, mask).logits,
            rtol=1e-5,
            atol=1e-5,
        )
    assert main(["export", str(tmp_path), "--to", "llava-hf", "--out", str(tmp_path / "x")]) == 2
    assert "not a stage folder" in capsys.readouterr().err
