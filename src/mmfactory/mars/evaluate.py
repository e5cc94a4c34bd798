"""MARS's evaluation: text-image consistency of generated images (judged cell by cell), a Fréchet distance
with its real-vs-real floor, captions and joint replies, and the LM's text perplexity before and after.

Every function takes its models and data as arguments; :class:`~mmfactory.tasks.mars.T2ITask` wires them.
:func:`evaluate_generator` scores any text-to-image generator given as a drawing function, so MARS and the
diffusion baseline are measured by one code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.data.image_text import ImageCaptions
from mmfactory.data.images import fit_image
from mmfactory.data.world_source import world_scene_layout
from mmfactory.eval.metrics import frechet_distance
from mmfactory.examples import Example, write_examples
from mmfactory.mars.judge import SceneJudge, consistency
from mmfactory.mars.sampling import SamplingConfig, generate_mixed, sample_images
from mmfactory.mars.sequences import SequenceBuilder, fill_codes, language_of
from mmfactory.models.components.vq import VQImageTokenizer, pixels_from_uint8, uint8_from_pixels
from mmfactory.models.t2i import TextToImageLM

EXAMPLES_PER_LANGUAGE = 4  # drawn images shown with their prompts


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 2) -> None:
    """uint8 ``[N, S, S, 3]`` -> one PNG grid (``columns`` wide, each image ``scale`` x nearest-upsampled)."""
    n, s = len(images), images.shape[1]
    rows = math.ceil(n / columns)
    grid = np.full((rows * s, columns * s, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * s : (r + 1) * s, c * s : (c + 1) * s] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST
    ).save(path)


@torch.no_grad()
def generate_images(
    model: TextToImageLM,
    vq: VQImageTokenizer,
    builder: SequenceBuilder,
    captions: Sequence[str],
    sampling: SamplingConfig,
    seed: int,
    batch_size: int = 32,
) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` images sampled for ``captions`` (seeded: one call, one set of images)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    side = math.isqrt(builder.n_codes)
    uncond = builder.prompt(None)
    out = []
    for start in range(0, len(captions), batch_size):
        prompts = [builder.prompt(c) for c in captions[start : start + batch_size]]
        codes = sample_images(model, prompts, uncond, builder.n_codes, sampling, generator)
        out.append(uint8_from_pixels(vq.decode(codes.view(-1, side, side))).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), dtype=np.uint8)


@torch.no_grad()
def judge_images(judge: SceneJudge, images: np.ndarray, batch_size: int = 256) -> dict[str, Tensor]:
    """The judge's outputs (``shape``, ``color``, ``background`` logits, ``features``) for uint8 images."""
    device = next(judge.parameters()).device
    parts: list[dict[str, Tensor]] = []
    for start in range(0, len(images), batch_size):
        pixels = pixels_from_uint8(torch.from_numpy(images[start : start + batch_size]).to(device))
        parts.append({k: v.cpu() for k, v in judge(pixels).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def consistency_metrics(judged: dict[str, Tensor], cells: np.ndarray, prefix: str) -> dict[str, float]:
    """``{prefix}_{position|shape|color|object|count|scene}`` in percent, means over images."""
    scores = consistency(judged, torch.from_numpy(cells))
    return {f"{prefix}_{name}": 100.0 * float(value.mean()) for name, value in scores.items()}


def fid_like(
    judge: SceneJudge, generated: np.ndarray, real: np.ndarray, floor_real: np.ndarray
) -> dict[str, float]:
    """Fréchet distance on judge features of generated vs real images, and the floor: two disjoint real sets
    of the same size (the distance the metric gives to real images at this sample count)."""
    n = min(len(generated), len(real), len(floor_real))
    features = [
        judge_images(judge, x[:n])["features"].double().numpy() for x in (generated, real, floor_real)
    ]
    return {
        "fd": frechet_distance(features[0], features[1]),
        "fd_real_floor": frechet_distance(features[2], features[1]),
        "fd_samples": n,
    }


@torch.no_grad()
def generate_captions(
    model: TextToImageLM,
    builder: SequenceBuilder,
    codes: Tensor,
    langs: Sequence[str],
    stop_ids: set[int],
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> list[str]:
    """A greedy caption for each image (codes ``[N, n]``), asked in language ``langs[i]``."""
    out: list[str] = []
    for start in range(0, len(codes), batch_size):
        chunk = codes[start : start + batch_size]
        prompts = [builder.caption_prompt(lang) for lang in langs[start : start + batch_size]]
        filled = [
            fill_codes(torch.tensor([p]), c[None].cpu(), model.text_vocab)[0].tolist()
            for p, c in zip(prompts, chunk, strict=True)
        ]
        greedy = SamplingConfig(cfg_scale=1.0, temperature=0.0)
        replies = generate_mixed(
            model, filled, builder.n_codes, stop_ids, max_new_tokens, greedy, allow_images=False
        )
        out += [_reply_text(builder, segments) for segments in replies]
    return out


def _reply_text(builder: SequenceBuilder, segments: list[tuple[str, list[int]]]) -> str:
    ids = [t for kind, tokens in segments if kind == "text" for t in tokens]
    return builder.tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_joint(
    model: TextToImageLM,
    vq: VQImageTokenizer,
    builder: SequenceBuilder,
    captions: Sequence[str],
    stop_ids: set[int],
    sampling: SamplingConfig,
    seed: int,
    max_new_tokens: int,
) -> list[tuple[np.ndarray | None, str]]:
    """Per caption, the joint reply's first image (uint8 ``[S, S, 3]``; None if it drew none) and its text."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    side = math.isqrt(builder.n_codes)
    unguided = SamplingConfig(**{**vars(sampling), "cfg_scale": 1.0})
    prompts = [builder.joint_prompt(c) for c in captions]
    replies = generate_mixed(
        model, prompts, builder.n_codes, stop_ids, max_new_tokens, unguided, True, generator
    )
    out = []
    for segments in replies:
        images = [codes for kind, codes in segments if kind == "image" and len(codes) == builder.n_codes]
        image = None
        if images:
            codes = torch.tensor(images[0], device=device).view(1, side, side)
            image = uint8_from_pixels(vq.decode(codes))[0].cpu().numpy()
        out.append((image, _reply_text(builder, segments)))
    return out


@torch.no_grad()
def text_nll(logits_of: Callable[[Tensor, Tensor], Tensor], batches: Sequence[dict[str, Tensor]]) -> float:
    """Mean next-token negative log-likelihood over every real (unpadded) token of the batches
    (``input_ids``, ``attention_mask``); ``logits_of(ids, mask)`` gives text logits ``[B, T, V]``."""
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = logits_of(ids, mask)[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        total += float(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        )
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)


@dataclass
class GenerationEval:
    """How a text-to-image generator is scored (MARS and the diffusion baseline alike)."""

    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # consistency at each scale
    default_scale: float = 2.0  # the scale of the Fréchet distance
    eval_prompts: int = 64  # eval images per language whose prompt is drawn
    fd_samples: int = 100  # per set: generated, real, and the second real set of the floor
    seed: int = 0


def eval_prompts(source: ImageCaptions, n: int) -> dict[str, tuple[list[int], list[str]]]:
    """Per language of the first ``n`` images' captions: (image indices, prompts), an image's prompt in a
    language being its longest caption in that language (the detailed one for world scenes)."""
    by_lang: dict[str, tuple[list[int], list[str]]] = {}
    for i, captions in enumerate(source.captions[:n]):
        longest: dict[str, str] = {}
        for caption in captions:
            lang = language_of(caption)
            if len(caption) > len(longest.get(lang, "")):
                longest[lang] = caption
        for lang, caption in longest.items():
            indices, prompts = by_lang.setdefault(lang, ([], []))
            indices.append(i)
            prompts.append(caption)
    return by_lang


Draw = Callable[[list[str], float, int], np.ndarray]  # (prompts, guidance scale, seed) -> uint8 [N, S, S, 3]


def evaluate_generator(
    draw: Draw,
    source: ImageCaptions,
    judge: SceneJudge | None,
    cfg: GenerationEval,
    image_size: int,
    stage_dir: Path,
) -> dict[str, float]:
    """Consistency per language and guidance scale (``t2i_{lang}_cfg{s}_{metric}``, with a judge and world
    scenes), sample grids and prompts in ``stage_dir/samples/``, examples at the largest scale (prompt,
    image, the judge's share of objects right; :mod:`mmfactory.examples`), and the Fréchet distance at
    ``default_scale`` of images drawn for eval images ``0..n-1`` against real images ``n..2n-1`` beside the
    floor (real ``0..n-1`` against the same ``n..2n-1``)."""
    metrics: dict[str, float] = {}
    out_dir = stage_dir / "samples"
    shown: list[Example] = []
    cells = world_scene_layout(source.scenes)[0] if source.scenes is not None else None
    for lang, (indices, prompts) in sorted(eval_prompts(source, min(cfg.eval_prompts, len(source))).items()):
        (out_dir / f"t2i_{lang}_prompts.txt").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / f"t2i_{lang}_prompts.txt").write_text("\n".join(prompts[:32]) + "\n", encoding="utf-8")
        for scale in cfg.cfg_scales:
            images = draw(prompts, scale, cfg.seed)
            save_grid(images[:32], out_dir / f"t2i_{lang}_cfg{scale:g}.png")
            objects = None
            if judge is not None and cells is not None:
                judged = judge_images(judge, images)
                metrics.update(consistency_metrics(judged, cells[indices], f"t2i_{lang}_cfg{scale:g}"))
                objects = consistency(judged, torch.from_numpy(cells[indices]))["object"]
            if scale == max(cfg.cfg_scales):
                for k in range(min(EXAMPLES_PER_LANGUAGE, len(prompts))):
                    fields = {"prompt": prompts[k]}
                    if objects is not None:
                        fields["judge"] = f"{100 * float(objects[k]):.0f} % of the objects right"
                    shown.append(Example(f"{lang} · CFG {scale:g}", fields, [images[k]]))
    write_examples(stage_dir, "Drawn images", shown)
    n = min(cfg.fd_samples, len(source) // 2)
    if judge is not None and n >= 2:
        first = np.stack([fit_image(source.image(i), image_size, 3) for i in range(n)])
        second = np.stack([fit_image(source.image(i), image_size, 3) for i in range(n, 2 * n)])
        prompts = [max(source.captions[i], key=len) for i in range(n)]
        generated = draw(prompts, cfg.default_scale, cfg.seed + 1)
        metrics.update(fid_like(judge, generated, second, first))
    return metrics


def evaluate_joint(
    model: TextToImageLM,
    vq: VQImageTokenizer,
    builder: SequenceBuilder,
    source: ImageCaptions,
    judge: SceneJudge | None,
    stop_ids: set[int],
    sampling: SamplingConfig,
    seed: int,
    n: int,
    out: Path,
) -> dict[str, float]:
    """Joint "draw and describe" replies to the prompts of the first ``n`` eval images per language
    (:func:`eval_prompts`): each drawn image in ``out/joint_{k}.png``, prompts and texts in ``out/joint.md``;
    ``joint_drew_image`` (percent of replies holding an image) and, with a judge and world scenes, the drawn
    images' consistency (``joint_{metric}``). ``n = 0``: nothing."""
    if not n:
        return {}
    picks = [
        (i, c)
        for lang, (idx, prompts) in sorted(eval_prompts(source, n).items())
        for i, c in zip(idx, prompts, strict=True)
    ]
    replies = generate_joint(
        model,
        vq,
        builder,
        [c for _, c in picks],
        stop_ids,
        sampling,
        seed,
        max_new_tokens=builder.n_codes + 2 + 96,  # <img>, the codes, </img> and the text
    )
    lines = ["# Joint replies: prompt, drawn image, written text\n"]
    drawn = []
    for k, ((i, caption), (image, text)) in enumerate(zip(picks, replies, strict=True)):
        name = f"joint_{k}.png"
        if image is not None:
            save_grid(image[None], out / name, columns=1, scale=4)
            drawn.append((i, image))
        lines.append(
            f"## {k}\nprompt: {caption}\n\nimage: {name if image is not None else '(none)'}\n\ntext: {text}\n"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "joint.md").write_text("\n".join(lines), encoding="utf-8")
    metrics = {"joint_drew_image": 100.0 * len(drawn) / len(picks)}
    if judge is not None and source.scenes is not None and drawn:
        cells = world_scene_layout([source.scenes[i] for i, _ in drawn])[0]
        judged = judge_images(judge, np.stack([img for _, img in drawn]))
        metrics.update(consistency_metrics(judged, cells, "joint"))
    return metrics
