"""MARS's model: a transformers causal LM that reads and writes VQ image tokens, with SemVIE visual experts.

Vocabulary. The LM's own rows ``0 .. V-1`` are text; new rows follow: code ``c`` of the image tokenizer is
id ``V + c`` (``c < K``), ``<img>`` is ``V + K`` and ``</img>`` is ``V + K + 1``. The new rows have their
own trainable embedding (``new_embed``, ``[K + 2, D]``) and output head (``new_head``, ``[K + 1, D]``: the
K codes and ``<img>``); the LM's text embedding and head are untouched.

Segments. A position whose next token is an image code predicts over the K codes only (the grid length
is fixed, so ``</img>`` is forced after the last code, in training and in sampling alike); any other
position predicts over the text vocabulary plus ``<img>``. Every new-vocabulary token (codes, ``<img>``,
``</img>``) takes the visual-expert path (:mod:`mmfactory.models.components.experts`); text takes the
frozen LM. ``experts="none"`` is the full fine-tuning baseline: no experts, image tokens go through the
LM's own (then trainable) weights.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.models.components.experts import (
    EXPERT_MODULES,
    add_visual_experts,
    expert_state_dict,
    load_experts,
    text_state_dict,
)

WEIGHTS, META = "t2i.safetensors", "t2i.json"


@dataclass
class T2ILayout:
    """What a saved model folder records besides its weights."""

    text_vocab_size: int
    codebook_size: int
    experts: Literal["semvie", "none"] = "semvie"
    expert_modules: list[str] = field(default_factory=lambda: list(EXPERT_MODULES))


class TextToImageLM(nn.Module):
    """``lm`` (a transformers causal LM) + image vocabulary; ``forward`` gives hidden states ``[B, T, D]``."""

    def __init__(self, lm: PreTrainedModel, layout: T2ILayout):
        super().__init__()
        self.lm, self.layout = lm, layout
        embed = lm.get_input_embeddings()
        if embed.num_embeddings != layout.text_vocab_size:
            raise ValueError(
                f"the LM has {embed.num_embeddings} text rows, the layout says {layout.text_vocab_size}"
            )
        dim, k = embed.embedding_dim, layout.codebook_size
        self.new_embed = nn.Embedding(k + 2, dim)
        self.new_head = nn.Linear(dim, k + 1, bias=False)
        with torch.no_grad():
            std = embed.weight.float().std().item()
            self.new_embed.weight.normal_(0.0, std)
            self.new_head.weight.normal_(0.0, std)
        self.new_embed.to(embed.weight.dtype)
        self.new_head.to(embed.weight.dtype)
        self.routing = add_visual_experts(lm, layout.expert_modules) if layout.experts == "semvie" else None

    # -- vocabulary ---------------------------------------------------------------------------------
    @property
    def text_vocab(self) -> int:
        return self.layout.text_vocab_size

    @property
    def codebook_size(self) -> int:
        return self.layout.codebook_size

    @property
    def boi(self) -> int:
        return self.text_vocab + self.codebook_size

    @property
    def eoi(self) -> int:
        return self.text_vocab + self.codebook_size + 1

    def embed(self, ids: Tensor) -> Tensor:
        """Ids ``[B, T]`` over text + new rows -> embeddings ``[B, T, D]``."""
        text = ids < self.text_vocab
        text_rows = self.lm.get_input_embeddings()(ids.clamp(max=self.text_vocab - 1))
        new_rows = self.new_embed((ids - self.text_vocab).clamp(min=0))
        return torch.where(text.unsqueeze(-1), text_rows, new_rows.to(text_rows.dtype))

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache=None,
        use_cache: bool = False,
    ):
        """Hidden states ``[B, T, D]`` after the final norm, and the KV cache when ``use_cache``."""
        route = self.routing.tokens(ids >= self.text_vocab) if self.routing is not None else nullcontext()
        with route:
            out = self.lm.model(
                inputs_embeds=self.embed(ids),
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
            )
        return out.last_hidden_state, out.cache

    def image_logits(self, hidden: Tensor) -> Tensor:
        """``[..., D]`` -> logits over the K codes ``[..., K]``."""
        return self.new_head(hidden)[..., : self.codebook_size]

    def text_logits(self, hidden: Tensor) -> Tensor:
        """``[..., D]`` -> logits over the text vocabulary and ``<img>`` (index V) ``[..., V + 1]``."""
        boi = F.linear(hidden, self.new_head.weight[self.codebook_size :])
        return torch.cat([self.lm.get_output_embeddings()(hidden), boi], dim=-1)

    def loss(self, hidden: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Next-token cross-entropy by segment: ``hidden`` ``[B, T, D]``, ``labels`` ``[B, T]`` (ids,
        ``IGNORE_INDEX`` where nothing is learned; ``</img>`` targets are never learned: forced).

        Returns ``loss`` (mean over learned targets), ``image_loss`` / ``text_loss`` (their segment means)
        and the counts ``image_tokens`` / ``text_tokens``.
        """
        h, targets = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        v, k = self.text_vocab, self.codebook_size
        is_image = (targets >= v) & (targets < v + k)
        is_text = (targets != IGNORE_INDEX) & ((targets < v) | (targets == self.boi))
        image_sum = F.cross_entropy(
            self.image_logits(h[is_image]).float(), targets[is_image] - v, reduction="sum"
        )
        text_targets = torch.where(targets[is_text] == self.boi, v, targets[is_text])
        text_sum = F.cross_entropy(self.text_logits(h[is_text]).float(), text_targets, reduction="sum")
        n_image, n_text = is_image.sum(), is_text.sum()
        return {
            "loss": (image_sum + text_sum) / (n_image + n_text).clamp(min=1),
            "image_loss": image_sum / n_image.clamp(min=1),
            "text_loss": text_sum / n_text.clamp(min=1),
            "image_tokens": n_image,
            "text_tokens": n_text,
        }

    # -- saving -------------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        """``lm/`` (the LM's own weights, loadable by ``AutoModelForCausalLM``: for SemVIE the frozen
        original), ``t2i.safetensors`` (new rows, head and visual experts) and ``t2i.json``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(out_dir / "lm", state_dict=text_state_dict(self.lm))
        weights = {"new_embed.weight": self.new_embed.weight, "new_head.weight": self.new_head.weight}
        weights.update({f"lm.{n}": t for n, t in expert_state_dict(self.lm).items()})
        save_file({n: t.detach().contiguous().cpu() for n, t in weights.items()}, out_dir / WEIGHTS)
        (out_dir / META).write_text(json.dumps(asdict(self.layout), indent=1))

    @classmethod
    def load(
        cls, folder: Path, dtype: torch.dtype = torch.float32, experts: str | None = None
    ) -> TextToImageLM:
        """A folder written by :meth:`save`. ``experts="none"`` on a SemVIE folder would drop its experts,
        and ``"semvie"`` on a full fine-tuning one would start fresh experts: both are refused."""
        layout = T2ILayout(**json.loads((folder / META).read_text()))
        if experts is not None and experts != layout.experts:
            raise ValueError(f"{folder} holds experts={layout.experts!r}; it cannot continue as {experts!r}")
        lm = AutoModelForCausalLM.from_pretrained(folder / "lm", dtype=dtype)
        model = cls(lm, layout)
        weights = load_file(folder / WEIGHTS)
        with torch.no_grad():
            model.new_embed.weight.copy_(weights.pop("new_embed.weight"))
            model.new_head.weight.copy_(weights.pop("new_head.weight"))
        if layout.experts == "semvie":
            load_experts(lm, {n.removeprefix("lm."): t for n, t in weights.items()})
        return model


def is_t2i_folder(folder: Path) -> bool:
    return (folder / META).is_file()
