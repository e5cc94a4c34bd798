"""Chat templates, tokenisation with assistant-only labels, and padding collation.

Conversations are rendered turn by turn so the token span of every assistant reply is known exactly:
labels are the reply's tokens (plus the end-of-turn token, so the model learns to stop) and
``IGNORE_INDEX`` everywhere else. The same renderer builds generation prompts, so training and
inference see identical prefixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatTemplate:
    """A turn is ``header(role) + content + end``; only ``content + end`` of assistant turns is learned."""

    header: str
    end: str
    separator: str  # after `end`, not learned

    def turn_header(self, role: str) -> str:
        return self.header.format(role=role)


TEMPLATES: dict[str, ChatTemplate] = {
    # Qwen2 / SmolLM2 / the world tokenizer
    "chatml": ChatTemplate(header="<|im_start|>{role}\n", end="<|im_end|>", separator="\n"),
    "llama3": ChatTemplate(
        header="<|start_header_id|>{role}<|end_header_id|>\n\n", end="<|eot_id|>", separator=""
    ),
}
TemplateName = Literal["chatml", "llama3"]


def chat_template_jinja(template: ChatTemplate, image_token: str | None = None) -> str:
    """A Hugging Face chat template (Jinja) that renders conversations as :func:`tokenize_chat` does, so
    ``tokenizer.apply_chat_template`` (transformers pipelines, vLLM) sees what the model was trained on.
    With ``image_token``, list contents are read too: ``{"type": "image"}`` items become the token and a
    newline, as the multimodal processor places them."""
    head, tail = template.header.split("{role}")
    text = json.dumps
    content = "{{ message['content'] }}"
    if image_token is not None:
        content = (
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}"
            f"{{% if item['type'] == 'image' %}}{{{{ {text(image_token + chr(10))} }}}}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
            "{% endfor %}{% endif %}"
        )
    return (
        "{% for message in messages %}"
        f"{{{{ {text(head)} + message['role'] + {text(tail)} }}}}"
        f"{content}"
        f"{{{{ {text(template.end + template.separator)} }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {text(head + 'assistant' + tail)} }}}}{{% endif %}}"
    )


@dataclass
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def has_targets(self) -> bool:
        """Whether any position is learned (the first token is never a next-token target)."""
        return any(label != IGNORE_INDEX for label in self.labels[1:])


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def tokenize_chat(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    max_length: int | None = None,
) -> TokenizedChat:
    """Token ids and labels of a conversation (``[{"role", "content"}, ...]``), right-truncated."""
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        head = _encode(tokenizer, template.turn_header(message["role"]))
        body = _encode(tokenizer, message["content"] + template.end)
        tail = _encode(tokenizer, template.separator)
        learn = message["role"] == "assistant"
        ids += head + body + tail
        labels += [IGNORE_INDEX] * len(head) + (body if learn else [IGNORE_INDEX] * len(body))
        labels += [IGNORE_INDEX] * len(tail)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedChat(ids, labels, truncated)


def generation_prompt(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate
) -> list[int]:
    """Token ids of the conversation so far followed by an open assistant turn."""
    ids = tokenize_chat(messages, tokenizer, template).input_ids
    return ids + _encode(tokenizer, template.turn_header("assistant"))


def pad_batch(
    sequences: list[list[int]], pad_value: int, pad_to_multiple_of: int | None = None
) -> torch.Tensor:
    """Right-pad to the longest sequence (optionally rounded up): ``[B, T]`` long."""
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate_chats(
    samples: list[TokenizedChat], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` (padding = IGNORE_INDEX) and ``attention_mask``, all ``[B, T]``."""
    input_ids = pad_batch([s.input_ids for s in samples], pad_token_id, pad_to_multiple_of)
    labels = pad_batch([s.labels for s in samples], IGNORE_INDEX, pad_to_multiple_of)
    mask = pad_batch([[1] * len(s.input_ids) for s in samples], 0, pad_to_multiple_of)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
