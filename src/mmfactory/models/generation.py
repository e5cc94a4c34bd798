"""Batched chat generation with a causal LM (greedy or sampling), left-padded prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmfactory.data.chat import ChatTemplate, generation_prompt


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 16


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> list[int]:
    """Token ids that end a reply: the template's end-of-turn token (if it is one token) and eos."""
    ids = []
    end = tokenizer.encode(template.end, add_special_tokens=False)
    if len(end) == 1:
        ids.append(end[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    conversations: list[list[dict[str, str]]],
    cfg: GenerationConfig,
) -> list[str]:
    """One assistant reply per conversation (each ends with a user turn)."""
    device = next(model.parameters()).device
    stop = end_of_turn_ids(tokenizer, template)
    replies: list[str] = []
    was_training = model.training
    model.eval()
    for lo in range(0, len(conversations), cfg.batch_size):
        prompts = [generation_prompt(c, tokenizer, template) for c in conversations[lo : lo + cfg.batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding keeps every prompt's end at the same column
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention[i, width - len(prompt) :] = 1
        sampling = (
            {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p} if cfg.do_sample else {}
        )
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    model.train(was_training)
    return replies
