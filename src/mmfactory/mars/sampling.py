"""Sampling from a :class:`~mmfactory.models.t2i.TextToImageLM`: images with classifier-free guidance, and
mixed replies (text and images in one response, or captions of an image).

Image codes are drawn over the K codes only (the text vocabulary is masked out), with temperature, top-k
and top-p. Guidance mixes ``uncond + s * (cond - uncond)`` from one batched forward over the conditional
and unconditional rows (``batched_cfg``) or from two separate forwards; both use the KV cache unless
``use_cache`` is off (then every step re-runs the whole sequence: the benchmark's baseline). Prompts are
left-padded, with position ids counted from each row's first real token, so every row sees the positions
it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmfactory.models.t2i import TextToImageLM


@dataclass
class SamplingConfig:
    cfg_scale: float = 2.0  # 1: no guidance (no unconditional rows)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    use_cache: bool = True
    batched_cfg: bool = True  # cond and uncond rows in one forward; False: two forwards per step

    def validate(self) -> None:
        from mmfactory.config import ConfigError

        if self.cfg_scale < 0:
            raise ConfigError(f"cfg_scale: must be >= 0, got {self.cfg_scale}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")


def cfg_mix(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on logits: ``uncond + scale * (cond - uncond)`` (1 = ``cond``)."""
    return uncond + scale * (cond - uncond)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``[B, V]`` logits with everything outside the top-k and outside the top-p nucleus set to -inf (the
    most likely token is always kept)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """One token per row of ``[B, V]`` logits (greedy at temperature 0)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention_mask, position_ids), all ``[B, T]``, of left-padded prompts."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class _Rows:
    """A batch of rows decoded step by step, with or without a KV cache."""

    def __init__(self, model: TextToImageLM, prompts: list[list[int]], use_cache: bool, pad_id: int):
        device = next(model.parameters()).device
        self.model, self.use_cache = model, use_cache
        self.ids, self.mask, self.positions = left_pad(prompts, pad_id, device)
        self.cache = None
        self.last = self._run(self.ids, self.mask, self.positions)

    def _run(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        hidden, cache = self.model(ids, mask, positions, cache=self.cache, use_cache=self.use_cache)
        self.cache = cache
        return hidden[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` ``[B]``; returns the new last hidden state ``[B, D]``."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], 1)
        new_position = self.positions[:, -1:] + 1
        self.positions = torch.cat([self.positions, new_position], 1)
        self.ids = torch.cat([self.ids, tokens[:, None]], 1)
        if self.use_cache:
            self.last = self._run(tokens[:, None], self.mask, new_position)
        else:
            self.last = self._run(self.ids, self.mask, self.positions)
        return self.last


@torch.no_grad()
def sample_images(
    model: TextToImageLM,
    prompts: list[list[int]],
    uncond_prompt: list[int],
    n_codes: int,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> Tensor:
    """Codes ``[B, n_codes]`` for prompts that end with ``<img>`` (see ``SequenceBuilder.prompt``)."""
    guided = cfg.cfg_scale != 1.0
    b = len(prompts)
    if guided and cfg.batched_cfg:
        groups = [_Rows(model, prompts + [uncond_prompt] * b, cfg.use_cache, pad_id)]
    elif guided:
        groups = [
            _Rows(model, prompts, cfg.use_cache, pad_id),
            _Rows(model, [uncond_prompt] * b, cfg.use_cache, pad_id),
        ]
    else:
        groups = [_Rows(model, prompts, cfg.use_cache, pad_id)]
    codes = []
    for step in range(n_codes):
        last = torch.cat([g.last for g in groups], 0)
        logits = model.image_logits(last).float()
        if guided:
            logits = cfg_mix(logits[:b], logits[b:], cfg.cfg_scale)
        code = draw(logits, cfg, generator)
        codes.append(code)
        if step + 1 < n_codes:
            token = code + model.text_vocab
            if len(groups) == 1:
                groups[0].step(token.repeat(len(groups[0].ids) // b))
            else:
                for g in groups:
                    g.step(token)
    return torch.stack(codes, 1)


@torch.no_grad()
def generate_mixed(
    model: TextToImageLM,
    prompts: list[list[int]],
    n_codes: int,
    stop_ids: set[int],
    max_new_tokens: int,
    cfg: SamplingConfig,
    allow_images: bool = True,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> list[list[tuple[str, list[int]]]]:
    """Replies that may hold text and images: per row a list of segments ``("text", token ids)`` /
    ``("image", codes)``. Text is greedy over the text vocabulary (+ ``<img>`` when ``allow_images``);
    after ``<img>`` exactly ``n_codes`` codes are drawn (``cfg`` without guidance), then ``</img>`` is forced.
    A row ends at a token of ``stop_ids`` or after ``max_new_tokens`` (codes count)."""
    rows = _Rows(model, prompts, cfg.use_cache, pad_id)
    b, v = len(prompts), model.text_vocab
    in_image = torch.zeros(b, dtype=torch.bool)
    count = torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    segments: list[list[tuple[str, list[int]]]] = [[] for _ in range(b)]
    stop = torch.tensor(sorted(stop_ids))
    for _ in range(max_new_tokens):
        last = rows.last
        text = model.text_logits(last).float()
        if not allow_images:
            text[:, v] = float("-inf")
        text_token = text.argmax(-1).cpu()
        text_token = torch.where(text_token == v, model.boi, text_token)
        code = draw(model.image_logits(last).float(), cfg, generator).cpu() + v
        forced_end = in_image & (count == n_codes)
        token = torch.where(in_image, code, text_token)
        token = torch.where(forced_end, torch.full_like(token, model.eoi), token)
        for i in range(b):  # bookkeeping of segments (per row, not per token of the model)
            if done[i]:
                continue
            t = int(token[i])
            if t == model.boi:
                segments[i].append(("image", []))
            elif t == model.eoi:
                pass
            elif in_image[i]:
                segments[i][-1][1].append(t - v)
            elif t not in stop_ids:
                if not segments[i] or segments[i][-1][0] != "text":
                    segments[i].append(("text", []))
                segments[i][-1][1].append(t)
        count = torch.where(in_image & ~forced_end, count + 1, torch.zeros_like(count))
        in_image = (in_image & ~forced_end) | (token == model.boi)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        rows.step(token.to(rows.ids.device))
    return segments
