"""Image-text scorers on a CLIP dual encoder: Filter & Align's reward model (trained on caption rankings) and
the image-text matching baseline (BLIP-score) share the model; they differ in what trains the head.

``r(i, t) = s * cos(i, t) + f(i, t)``: the CLIP cosine of the L2-normalised projected embeddings, scaled by
a learnt ``s`` (``cosine_scale`` at initialisation), plus a fusion head ``f`` whose output layer starts at
zero, so a fresh scorer ranks exactly as the CLIP cosine and learns what the cosine misses. Heads:

* ``mlp``: ``MLP([i, t, i * t])`` on the global embeddings (``3D -> hidden -> 1``, GELU);
* ``cross``: an image-grounded text encoder, as BLIP's ITM head and ImageReward have it: the text tower's
  token states (projected to ``hidden``) pass ``layers`` pre-norm blocks of text self-attention, cross-
  attention to the vision tower's patch states (projected) and an FFN; the first token's output is scored.
  It sees which patch holds which colour and shape, which a global embedding may not carry.

The text side is CLIP's text tower, or any transformers text encoder (:class:`SentenceEncoder`, e.g. a
sentence-transformers folder such as all-MiniLM-L6-v2, its pooling honoured) whose pooled output the head's
``text_projection`` (a linear map, part of the head, so it trains whenever the head does) takes to CLIP's
width; the cosine term then starts untrained.

Saved as the CLIP folder (``CLIPModel.from_pretrained`` reads it) plus ``reward_head.safetensors`` and
``reward_head.json`` (:func:`load_scorer`; a ``reward_head.json`` without ``fusion`` is an ``mlp`` head);
a separate text encoder in ``text_encoder/`` (its own ``from_pretrained`` folder and tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmfactory.models.clip import CLIPSpec, load_clip, tokenize_for_clip

HEAD_CONFIG, HEAD_WEIGHTS = "reward_head.json", "reward_head.safetensors"
TEXT_ENCODER = "text_encoder"
FUSIONS = ("mlp", "cross")
POOLINGS = ("mean", "cls", "max")


@dataclass
class Encoded:
    """One tower's output for ``N`` inputs: ``embedding [N, D]`` (L2-normalised, projected), ``tokens
    [N, T, H]`` (last hidden states) and ``mask [N, T]`` (1 = a real token; None: all real)."""

    embedding: Tensor
    tokens: Tensor
    mask: Tensor | None = None


class MLPFusion(nn.Module):
    """``MLP([i, t, i * t]) -> [N]`` on the global embeddings."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, image: Encoded, text: Encoded) -> Tensor:
        i, t = image.embedding, text.embedding
        return self.mlp(torch.cat([i, t, i * t], dim=-1)).squeeze(-1)


class GroundedBlock(nn.Module):
    """Pre-norm text self-attention, cross-attention to image tokens, FFN: ``[N, L, W] -> [N, L, W]``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_image, self.norm_ffn = (
            nn.LayerNorm(width) for _ in range(4)
        )
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, padding: Tensor | None, image: Tensor) -> Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        v = self.norm_image(image)
        x = x + self.cross_attn(self.norm_cross(x), v, v, need_weights=False)[0]
        return x + self.ffn(self.norm_ffn(x))


class CrossFusion(nn.Module):
    """An image-grounded text encoder over token states: ``-> [N]`` (module docstring)."""

    def __init__(self, text_width: int, image_width: int, hidden: int, layers: int, heads: int):
        super().__init__()
        self.text_in, self.image_in = nn.Linear(text_width, hidden), nn.Linear(image_width, hidden)
        self.blocks = nn.ModuleList(GroundedBlock(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, image: Encoded, text: Encoded) -> Tensor:
        x, v = self.text_in(text.tokens), self.image_in(image.tokens)
        padding = None if text.mask is None else text.mask == 0
        for block in self.blocks:
            x = block(x, padding, v)
        return self.out(self.norm(x[:, 0])).squeeze(-1)


def sentence_pooling(folder: Path) -> str:
    """The pooling a sentence-transformers folder declares (``1_Pooling/config.json``); ``mean`` when it
    declares none (a plain transformers encoder)."""
    config = folder / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    modes = json.loads(config.read_text())
    for mode, key in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens")):
        if modes.get(key):
            return mode
    if modes.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ValueError(f"{config}: a pooling other than mean, cls or max is not supported")


class SentenceEncoder(nn.Module):
    """A transformers text encoder and its tokenizer as the scorer's text side: ``(input_ids,
    attention_mask [N, T]) -> (pooled [N, H], tokens [N, T, H])``, ``pooled`` being the masked mean, the
    first token or the masked max of the last hidden states (sentence-transformers' modes)."""

    def __init__(self, encoder: nn.Module, tokenizer, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: {pooling!r}; expected one of {POOLINGS}")
        self.encoder, self.tokenizer, self.pooling = encoder, tokenizer, pooling

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask [B, L]``: the tokenizer's own special tokens, right-padded."""
        encoded = self.tokenizer(
            list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def save_pretrained(self, folder: Path) -> None:
        """The encoder's and tokenizer's own folder."""
        self.encoder.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "max":
            pooled = tokens.masked_fill(mask == 0, torch.finfo(tokens.dtype).min).amax(1)
        else:
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled, tokens


@dataclass
class HeadConfig:
    fusion: str = "mlp"
    dim: int = 64  # the projected embedding width (CLIP's projection_dim)
    hidden: int = 256
    layers: int = 2  # cross only
    heads: int = 4  # cross only
    text_width: int = 64  # the text tower's hidden size (cross, text_projection)
    image_width: int = 64  # cross only: the vision tower's hidden size
    text_projection: bool = False  # a separate text side: its pooled width (text_width) -> dim


class ScorerHead(nn.Module):
    """``s * cos(i, t) + fusion(i, t)``: ``(Encoded image, Encoded text) -> [N]`` scores; with
    ``text_projection``, also the map of a separate text side's pooled states to the embedding width."""

    def __init__(self, config: HeadConfig, cosine_scale: float):
        super().__init__()
        if config.fusion not in FUSIONS:
            raise ValueError(f"fusion: {config.fusion!r}; expected one of {FUSIONS}")
        self.config = config
        self.cosine_scale = nn.Parameter(torch.tensor(float(cosine_scale)))
        if config.fusion == "mlp":
            self.fusion = MLPFusion(config.dim, config.hidden)
        else:
            self.fusion = CrossFusion(
                config.text_width, config.image_width, config.hidden, config.layers, config.heads
            )
        if config.text_projection:
            self.text_projection = nn.Linear(config.text_width, config.dim)

    def forward(self, image: Encoded, text: Encoded) -> Tensor:
        cosine = (image.embedding * text.embedding).sum(-1)
        return self.cosine_scale * cosine + self.fusion(image, text)


class ImageTextScorer(nn.Module):
    """CLIP + :class:`ScorerHead` (``head`` None: the cosine alone is meaningful); ``text_side``: a
    :class:`SentenceEncoder` in place of CLIP's text tower."""

    def __init__(self, clip, head: ScorerHead | None, text_side: SentenceEncoder | None = None):
        super().__init__()
        self.clip, self.head, self.text_side = clip, head, text_side

    @property
    def max_text_length(self) -> int:
        """The text side's positions."""
        if self.text_side is not None:
            return self.text_side.encoder.config.max_position_embeddings
        return self.clip.config.text_config.max_position_embeddings

    def embed_images(self, pixel_values: Tensor) -> Encoded:
        out = self.clip.get_image_features(pixel_values=pixel_values)
        return Encoded(F.normalize(out.pooler_output, dim=-1), out.last_hidden_state)

    def embed_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Encoded:
        if self.text_side is not None:
            pooled, tokens = self.text_side(input_ids, attention_mask)
            return Encoded(F.normalize(self.head.text_projection(pooled), dim=-1), tokens, attention_mask)
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return Encoded(F.normalize(out.pooler_output, dim=-1), out.last_hidden_state, attention_mask)

    def score(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.embed_images(pixel_values), self.embed_texts(input_ids, attention_mask))

    def save_pretrained(self, folder: Path) -> None:
        self.clip.save_pretrained(folder)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(weights, folder / HEAD_WEIGHTS)
        config = {**vars(self.head.config)}
        if self.text_side is not None:
            self.text_side.save_pretrained(folder / TEXT_ENCODER)
            config["text_pooling"] = self.text_side.pooling
        (folder / HEAD_CONFIG).write_text(json.dumps(config, indent=1))


def head_config_for(
    clip, fusion: str, hidden: int, layers: int, heads: int, text_side: SentenceEncoder | None = None
) -> HeadConfig:
    """The head's shapes for a CLIP model's towers (and a separate text side's width)."""
    text = text_side.encoder.config if text_side is not None else clip.config.text_config
    return HeadConfig(
        fusion,
        clip.config.projection_dim,
        hidden,
        layers,
        heads,
        text.hidden_size,
        clip.config.vision_config.hidden_size,
        text_side is not None,
    )


def load_text_side(folder: Path, pooling: str) -> SentenceEncoder:
    """The text encoder of a local folder (``AutoModel`` and ``AutoTokenizer`` read it); ``pooling``
    ``auto``: the folder's sentence-transformers pooling (:func:`sentence_pooling`)."""
    from transformers import AutoModel, AutoTokenizer

    encoder, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    return SentenceEncoder(encoder, tokenizer, sentence_pooling(folder) if pooling == "auto" else pooling)


def load_scorer(folder: str | Path):
    """``(model, tokenizer, image_processor)`` of a saved scorer (an ``image_text_reward`` or
    ``image_text_matching`` stage's ``final/``)."""

    folder = Path(folder)
    if not (folder / HEAD_CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder}: no {HEAD_CONFIG}; not a scorer saved by a reward or matching stage"
        )
    clip, tokenizer, image_processor = load_clip(CLIPSpec(), folder)
    config = json.loads((folder / HEAD_CONFIG).read_text())
    weights = load_file(folder / HEAD_WEIGHTS)
    if "fusion" not in config:  # saved before the cross head existed: an MLP head at the top level
        weights = {k if k == "cosine_scale" else f"fusion.{k}": v for k, v in weights.items()}
    text_side = None
    if "text_pooling" in config:
        text_side = load_text_side(folder / TEXT_ENCODER, config.pop("text_pooling"))
    head = ScorerHead(HeadConfig(**config), 0.0)
    head.load_state_dict(weights)
    return ImageTextScorer(clip, head, text_side).eval(), tokenizer, image_processor


def tokenize_texts(model: ImageTextScorer, tokenizer, texts: list[str], max_length: int) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask [B, L]`` for the scorer's text side: CLIP's tower (``tokenizer``
    is CLIP's) pools at an EOS (:func:`~mmfactory.models.clip.tokenize_for_clip`); a separate encoder
    tokenizes with its own tokenizer."""
    if model.text_side is None:
        return tokenize_for_clip(tokenizer, texts, max_length)
    return model.text_side.tokenize(texts, max_length)
