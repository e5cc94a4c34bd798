"""Drawing with a saved MARS folder (``mmfactory generate --model DIR --prompt ... --out DIR``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mmfactory.data.chat import resolve_template
from mmfactory.mars.evaluate import generate_images, generate_joint
from mmfactory.mars.sampling import SamplingConfig
from mmfactory.mars.sequences import Instructions, SequenceBuilder
from mmfactory.models.components.vq import VQImageTokenizer
from mmfactory.models.t2i import TextToImageLM

GENERATION_META = "mars_generation.json"  # template, image size and instructions of a saved T2I folder


@dataclass
class T2IFolder:
    model: TextToImageLM
    tokenizer: PreTrainedTokenizerBase
    vq: VQImageTokenizer
    builder: SequenceBuilder

    def stop_ids(self) -> set[int]:
        end = self.tokenizer.encode(self.builder.template.end, add_special_tokens=False)
        return {*end, self.tokenizer.eos_token_id}


def load_t2i_folder(folder: Path) -> T2IFolder:
    """A ``mars_t2i`` stage's ``final/``: the model, its tokenizer, its VQ tokenizer and sequence format."""
    meta = json.loads((folder / GENERATION_META).read_text(encoding="utf-8"))
    model = TextToImageLM.load(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "lm")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vq = VQImageTokenizer.from_pretrained(folder / "vq").eval()
    instructions = Instructions(**meta["instructions"])
    template = resolve_template(meta["template"], tokenizer)
    builder = SequenceBuilder(tokenizer, template, model.boi, model.eoi, meta["n_codes"], instructions)
    return T2IFolder(model, tokenizer, vq, builder)


def draw_to_folder(
    folder: T2IFolder,
    prompts: list[str],
    out_dir: Path,
    sampling: SamplingConfig,
    images_per_prompt: int = 1,
    seed: int = 0,
    joint: bool = False,
    scale: int = 4,
) -> list[Path]:
    """Write ``{prompt index:03d}_{k}.png`` (nearest-upscaled by ``scale``) for each prompt, and with
    ``joint`` each reply's text beside it (``.txt``); returns the PNG paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    repeated = [p for p in prompts for _ in range(images_per_prompt)]
    if joint:
        replies = generate_joint(
            folder.model,
            folder.vq,
            folder.builder,
            repeated,
            folder.stop_ids(),
            sampling,
            seed,
            max_new_tokens=folder.builder.n_codes + 130,
        )
    else:
        images = generate_images(folder.model, folder.vq, folder.builder, repeated, sampling, seed)
        replies = [(image, "") for image in images]
    paths = []
    for i, (image, text) in enumerate(replies):
        stem = f"{i // images_per_prompt:03d}_{i % images_per_prompt}"
        if image is not None:
            path = out_dir / f"{stem}.png"
            Image.fromarray(np.asarray(image)).resize(
                (image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST
            ).save(path)
            paths.append(path)
        if joint:
            (out_dir / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    (out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return paths
