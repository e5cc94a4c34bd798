"""mars/tiny through the real CLI, shrunk: every stage learns; SemVIE trains only the experts and the new
rows while the saved LM equals the text LM stage bit for bit (and its text perplexity is unchanged), the
full fine-tuning baseline changes the LM; the diffusion baseline is scored by the same judge; `mmfactory
generate` draws PNGs from the saved folder."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmfactory.cli import main

T2I = ["align", "refine", "align_full", "refine_full"]
SMALL_LM = (
    "{tiny: {model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 256, "
    "tie_word_embeddings: true}}"
)
OVERRIDES = [
    f"stages.lm.model={SMALL_LM}",
    "stages.lm.data.train=[{format: world, kind: chat, size: 64}]",
    "stages.lm.data.eval=[{format: world, kind: chat, split: val, size: 8}]",
    "stages.lm.train.max_steps=30",
    "stages.lm.options.eval.generate=0",
    "stages.vq.model.tiny={hidden_sizes: [8, 16, 16], embed_dim: 4, codebook_size: 32}",
    "stages.vq.data.train=[{format: world, kind: scenes, size: 64}]",
    "stages.vq.data.eval=[{format: world, kind: scenes, split: val, size: 16}]",
    "stages.vq.train.max_steps=30",
    "stages.judge.model.hidden_sizes=[8, 16]",
    "stages.judge.data.train=[{format: world, kind: scenes, size: 64}]",
    "stages.judge.data.eval=[{format: world, kind: scenes, split: val, size: 16}]",
    "stages.judge.train.max_steps=20",
    "train.log_every=1",
    "train.batch_size=8",
    "stages.diffusion.model.unet={block_out_channels: [8, 16], layers_per_block: 1, attention_head_dim: 4, "
    "norm_num_groups: 8, down_block_types: [DownBlock2D, CrossAttnDownBlock2D], "
    "up_block_types: [CrossAttnUpBlock2D, UpBlock2D]}",
    "stages.diffusion.model.sample_steps=3",
    "stages.diffusion.data.train=[{format: world, kind: scenes, size: 32, languages: [en, zh]}]",
    "stages.diffusion.data.eval=[{format: world, kind: scenes, split: val, size: 8, languages: [en, zh]}]",
    "stages.diffusion.train.max_steps=10",
    "stages.diffusion.options.generation={cfg_scales: [1.0, 2.0], eval_prompts: 4, fd_samples: 4}",
]
for stage in T2I:
    OVERRIDES += [
        f"stages.{stage}.data.train=[{{format: world, kind: scenes, size: 32, languages: [en, zh]}}]",
        f"stages.{stage}.data.eval=[{{format: world, kind: scenes, split: val, size: 8, languages: [en, zh], "
        "details: [detailed]}]",
        f"stages.{stage}.data.text_eval=[{{format: world, kind: chat, split: val, size: 8}}]",
        f"stages.{stage}.train.max_steps={30 if stage.startswith('align') else 5}",
        f"stages.{stage}.options.eval_prompts=4",
        f"stages.{stage}.options.fd_samples=4",
        f"stages.{stage}.options.eval_captions=2",
        f"stages.{stage}.options.joint_samples=2",
        f"stages.{stage}.options.cfg_scales=[1.0, 2.0]",
    ]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(stage_dir):
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_mars_tiny_through_cli(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["run", "mars/tiny", "--output", str(out), *OVERRIDES]) == 0
    assert "Results of mars/tiny" in capsys.readouterr().out
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    for stage in ["lm", "vq", "judge", "align", "align_full"]:
        losses = _losses(out / stage)
        assert losses[-1] < losses[0], (stage, losses[0], losses[-1])

    text_lm = load_file(out / "lm" / "final" / "model.safetensors")
    for stage, experts in [("align", True), ("refine", True), ("align_full", False), ("refine_full", False)]:
        saved = load_file(out / stage / "final" / "lm" / "model.safetensors")
        same = all(torch.equal(saved[k], text_lm[k]) for k in text_lm)
        assert same == experts, stage  # SemVIE keeps the text LM; full fine-tuning changes it
        for key in [
            "t2i_en_cfg2_object",
            "t2i_zh_cfg1_color",
            "fd",
            "fd_real_floor",
            "caption_en_exact",
            "joint_drew_image",
            "text_ppl",
            "text_ppl_before",
        ]:
            assert f"{stage}/{key}" in metrics, (stage, key)
        assert (out / stage / "samples" / "t2i_zh_cfg2.png").is_file()
    assert metrics["align/text_ppl"] == metrics["align/text_ppl_before"]
    for key in ["t2i_en_cfg2_object", "t2i_zh_cfg1_color", "fd", "fd_real_floor"]:
        assert f"diffusion/{key}" in metrics, key  # the baseline is scored by the same code
    assert metrics["diffusion/train_tflops"] > 0 and metrics["align/train_tflops"] > 0
    assert metrics["align_full/text_ppl"] != metrics["align_full/text_ppl_before"]

    initial = load_file(out / "align" / "final" / "t2i.safetensors")
    refined = load_file(out / "refine" / "final" / "t2i.safetensors")
    assert set(initial) == set(refined) and any(not torch.equal(initial[k], refined[k]) for k in initial)

    pngs = tmp_path / "pngs"
    prompt = "A large red star at the top left, on a black background."
    assert (
        main(
            [
                "generate",
                "--model",
                str(out / "refine" / "final"),
                "--prompt",
                prompt,
                "--prompt",
                "左上方有一个大的红色星形。",
                "--num-images",
                "2",
                "--out",
                str(pngs),
            ]
        )
        == 0
    )
    images = sorted(pngs.glob("*.png"))
    assert len(images) == 4 and Image.open(images[0]).size == (128, 128)
