"""Audio-Visual LLM's modality gating: encoder work and step time on a mixed batch, against running every
encoder on every sample.

    .venv/bin/python benchmarks/av_encoders.py --threads 1
    .venv/bin/python benchmarks/av_encoders.py --threads 1 --vision-hidden 384 --vision-layers 12
    .venv/bin/python benchmarks/av_encoders.py --device cuda --hidden 1024 --layers 16 --batch 24

A batch of ``--batch`` samples, a third visual-only, a third audio-only, a third audio-visual (1:1:1), is
trained one step (forward, cross-entropy over every token, backward, AdamW; projectors and LM trainable, both
encoders frozen as in the paper) by an :class:`~mmfactory.models.av_llm.AudioVisualLM`:

* **gated** (mmfactory): the collate function gives each encoder only the samples that carry its stream, so
  the vision tower sees the frames of 2/3 of the samples and the audio tower the clips of 2/3;
* **every encoder on every sample** (the peer: a model without modality gating, which encodes both streams
  of every sample and keeps the features the sample's placeholders ask for).

Encoder passes are counted with forward hooks (frames into the vision tower, clips into the audio tower) and
FLOPs with ``torch.utils.flop_counter`` (forward of the encoders, forward of the LM). The ratio of encoder
to LM forward FLOPs is printed: gating saves what the encoders cost, so the step-time gain grows with it.
Runs are interleaved (one of each per round, the first round dropped); medians of wall and CPU time.
"""

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mmfactory.data.av import AVProcessor, AVSample
from mmfactory.data.multimodal import MultimodalProcessor
from mmfactory.models.audio import AudioTowerConfig
from mmfactory.models.av_llm import AudioVisualLMSpec, build_audio_visual_lm
from mmfactory.models.lm import CausalLMConfig
from mmfactory.models.mllm import merge_modal_embeddings
from mmfactory.models.vision import VisionTowerConfig

KINDS = ("video", "audio", "audio-visual")


def build(args):
    torch.manual_seed(0)
    vision = {"hidden_size": args.vision_hidden, "intermediate_size": 4 * args.vision_hidden}
    vision |= {
        "num_hidden_layers": args.vision_layers,
        "num_attention_heads": 4,
        "image_size": 30,
        "patch_size": 10,
    }
    audio = {"d_model": args.audio_hidden, "encoder_layers": args.audio_layers, "encoder_attention_heads": 4}
    audio |= {"encoder_ffn_dim": 4 * args.audio_hidden, "num_mel_bins": 80, "max_source_positions": 50}
    lm = {"model_type": "qwen2", "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden}
    lm |= {"num_hidden_layers": args.layers, "num_attention_heads": 8, "num_key_value_heads": 4}
    lm |= {"max_position_embeddings": 512, "tie_word_embeddings": True}
    spec = AudioVisualLMSpec(
        vision=VisionTowerConfig(tiny={"model_type": "clip_vision_model", **vision}),
        audio=AudioTowerConfig(tiny=audio),
        lm=CausalLMConfig(tiny=lm),
        audio_tokens=10,
        video_frames=args.frames,
    )
    model, tokenizer, image_processor, extractor = build_audio_visual_lm(spec)
    cfg = model.config
    base = MultimodalProcessor(tokenizer, image_processor, cfg.num_image_tokens)
    processor = AVProcessor(base, extractor, cfg.video_frames, cfg.num_video_tokens, cfg.audio_tokens)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = not name.startswith(("vision_tower.", "audio_tower."))
    return model.to(args.device), processor


def batches(processor: AVProcessor, args):
    """(gated batch, the same batch with both streams of every sample for the ungated peer, needed masks)."""
    rng = np.random.default_rng(0)
    prefix = {"video": "<video>\n", "audio": "<audio>\n", "audio-visual": "<video>\n<audio>\n"}
    text = " ".join(["word"] * args.text_tokens)
    gated, full = [], []
    for i in range(args.batch):
        kind = KINDS[i % 3]
        video = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)
        messages = [{"role": "user", "content": prefix[kind] + text}, {"role": "assistant", "content": text}]
        chat = processor.tokenize(messages)
        video_used, audio_used = (video if kind != "audio" else None), (audio if kind != "video" else None)
        gated.append(AVSample(chat.input_ids, chat.labels, False, video_used, audio_used, 16000))
        full.append(AVSample(chat.input_ids, chat.labels, False, video, audio, 16000))
    needs_video = torch.tensor([KINDS[i % 3] != "audio" for i in range(args.batch)])
    needs_audio = torch.tensor([KINDS[i % 3] != "video" for i in range(args.batch)])
    return processor.collate(gated), processor.collate(full), needs_video, needs_audio


def forward(model, batch, needs=None):
    """Logits; ``needs`` (video mask, audio mask): the ungated peer, both encoders on every sample."""
    if needs is None:
        return model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **{k: batch[k] for k in model.media_inputs},
        ).logits
    cfg = model.config
    videos = model.encode_videos(batch["video_values"])[needs[0]]
    clips = model.encode_audio(batch["audio_features"])[needs[1]]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    embeds = merge_modal_embeddings(
        embeds, batch["input_ids"], {cfg.video_token_id: videos, cfg.audio_token_id: clips}
    )
    return model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


def step(model, optimizer, batch, needs=None):
    logits = forward(model, batch, needs)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count(model, batch, needs=None):
    """(frames into the vision tower, clips into the audio tower, encoder GFLOPs, LM GFLOPs), forward."""
    seen = {"vision": 0, "audio": 0}

    def counter(name):
        return lambda module, inputs: seen.__setitem__(name, seen[name] + len(inputs[0]))

    hooks = [
        model.vision_tower.register_forward_pre_hook(counter("vision")),
        model.audio_tower.register_forward_pre_hook(counter("audio")),
    ]
    with torch.no_grad(), FlopCounterMode(display=False) as total:
        forward(model, batch, needs)
    for hook in hooks:
        hook.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as encoders:
        model.vision_tower(batch["video_values"])
        model.audio_tower(batch["audio_features"])
    encoder_flops = encoders.get_total_flops()
    return seen["vision"], seen["audio"], encoder_flops / 1e9, (total.get_total_flops() - encoder_flops) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-hidden", type=int, default=192)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--audio-hidden", type=int, default=192)
    parser.add_argument("--audio-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = build(args)
    gated, full, needs_video, needs_audio = batches(processor, args)
    gated = {k: v.to(args.device) for k, v in gated.items()}
    full = {k: v.to(args.device) for k, v in full.items()}
    needs = (needs_video.to(args.device), needs_audio.to(args.device))
    with torch.no_grad():  # the peer computes the same logits
        assert torch.allclose(forward(model, gated), forward(model, full, needs), atol=1e-4)
    settings = {"gated (mmfactory)": (gated, None), "every encoder on every sample": (full, needs)}
    counts = {name: count(model, *inputs) for name, inputs in settings.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = {name: [] for name in settings}
    for round_ in range(args.repeats + 1):
        for name, inputs in settings.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            step(model, optimizer, *inputs)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {args.device}, {threads} thread(s), fp32, batch {args.batch} (1:1:1)")
    print(
        f"vision {args.vision_hidden} x {args.vision_layers} layers, {args.frames} frames of 30 px a video;"
    )
    print(
        f"audio {args.audio_hidden} x {args.audio_layers} layers, 1 s clips; LM {args.hidden} x {args.layers}"
    )
    print()
    columns = ["setting", "frames encoded", "clips encoded", "encoder GFLOPs", "LM GFLOPs", "encoder:LM"]
    print("| " + " | ".join([*columns, "wall ms", "CPU ms", "wall / peer"]) + " |")
    print("|---" * (len(columns) + 3) + "|")
    peer = statistics.median(t[0] for t in times["every encoder on every sample"])
    for name in settings:
        frames, clips, enc, lm = counts[name]
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        row = [name, frames, clips, f"{enc:.2f}", f"{lm:.2f}", f"{enc / lm:.2f}"]
        row += [f"{1e3 * wall:.1f}", f"{1e3 * cpu:.1f}", f"{wall / peer:.2f}x"]
        print("| " + " | ".join(map(str, row)) + " |")
    passes = {name: counts[name][0] // args.frames + counts[name][1] for name in settings}
    skipped = 1 - passes["gated (mmfactory)"] / passes["every encoder on every sample"]
    print(f"\nencoder passes (videos + clips): {passes}; skipped by gating: {100 * skipped:.0f} %")


if __name__ == "__main__":
    main()
