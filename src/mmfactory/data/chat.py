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

from mmfactory.config import ConfigError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatTemplate:
    """A turn is ``header(role) + content + end``; only ``content + end`` of assistant turns is learned.

    ``prefix`` opens every conversation (e.g. a BOS written by the template); ``default_system`` is the
    system turn a template adds when a conversation has none (SmolLM2's, Qwen2.5's). Neither is learned.
    """

    header: str
    end: str
    separator: str  # after `end`, not learned
    prefix: str = ""
    default_system: str | None = None

    def turn_header(self, role: str) -> str:
        return self.header.format(role=role)

    def with_default_system(self, messages: list[dict]) -> list[dict]:
        if self.default_system is None or (messages and messages[0]["role"] == "system"):
            return messages
        return [{"role": "system", "content": self.default_system}, *messages]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as :func:`tokenize_chat` lays it out."""
        turns = "".join(
            self.turn_header(m["role"]) + m["content"] + self.end + self.separator
            for m in self.with_default_system(messages)
        )
        return self.prefix + turns + (self.turn_header("assistant") if add_generation_prompt else "")


TEMPLATES: dict[str, ChatTemplate] = {
    # Qwen2 / SmolLM2 / the world tokenizer
    "chatml": ChatTemplate(header="<|im_start|>{role}\n", end="<|im_end|>", separator="\n"),
    "llama3": ChatTemplate(
        header="<|start_header_id|>{role}<|end_header_id|>\n\n", end="<|eot_id|>", separator=""
    ),
}
TemplateName = Literal["chatml", "llama3", "auto"]  # auto: the tokenizer's own chat_template

# Probe contents for reading a tokenizer's template: text no template writes by itself.
_PROBE = {
    "system": "\u2063sys-probe\u2063",
    "user": "\u2063user-probe-{}\u2063",
    "assistant": "\u2063bot-probe-{}\u2063",
}


def template_from_tokenizer(tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """The tokenizer's own ``chat_template`` read as a :class:`ChatTemplate` (header with the role, end,
    separator, a leading prefix and a default system turn), checked to render probe conversations exactly as
    ``apply_chat_template`` does. A template of another form is refused: turn-by-turn rendering is what
    makes the learned span of each reply exact."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"template: auto: {name} has no chat_template; name one of chatml, llama3")

    def render(messages: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    user, reply = _PROBE["user"].format(1), _PROBE["assistant"].format(1)
    one = render([{"role": "user", "content": user}])
    open_turn = render([{"role": "user", "content": user}], gen=True)
    full = render([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
    try:
        assistant_header = open_turn[len(one) :] if open_turn.startswith(one) else None
        after = full[len(open_turn) + len(reply) :] if full.startswith(open_turn + reply) else None
        end = after.rstrip()
        header = assistant_header.replace("assistant", "{role}", 1)
        before_user = one[: one.index(user)]
        start = before_user[: -len(header.format(role="user"))]
        assert before_user.endswith(header.format(role="user")) and "{role}" in header and end
        template = ChatTemplate(header, end, after[len(end) :], prefix=start)
        system = header.format(role="system")
        if start.endswith(after) and system in start:  # the template's own system turn when none is given
            head, _, rest = start.rpartition(system)
            template = ChatTemplate(header, end, template.separator, head, rest[: -len(after)])
    except (AssertionError, AttributeError, ValueError, TypeError):
        template = None
    probes = [
        [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
        [
            {"role": "system", "content": _PROBE["system"]},
            *({"role": r, "content": _PROBE[r].format(i)} for i in (1, 2) for r in ("user", "assistant")),
        ],
    ]
    if template is None or any(
        template.render(p) != render(p) or template.render(p[:-1], True) != render(p[:-1], True)
        for p in probes
    ):
        raise ConfigError(
            f"template: auto: {name}'s chat_template is not of the form header(role) + content + end per "
            "turn (or changes earlier turns as the conversation grows), so the learned span of each reply "
            "could not be exact; name one of chatml, llama3"
        )
    return template


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """A named template, or (``auto``) the tokenizer's own."""
    return template_from_tokenizer(tokenizer) if name == "auto" else TEMPLATES[name]


def chat_template_jinja(template: ChatTemplate, image_token: str | None = None) -> str:
    """A Hugging Face chat template (Jinja) that renders conversations as :func:`tokenize_chat` does, so
    ``tokenizer.apply_chat_template`` (transformers pipelines, vLLM) sees what the model was trained on.
    With ``image_token``, list contents are read too: ``{"type": "image"}`` items become the token and a
    newline, as the multimodal processor places them."""
    head, tail = template.header.split("{role}")
    text = json.dumps
    opening = f"{{{{ {text(template.prefix)} }}}}" if template.prefix else ""
    if template.default_system is not None:
        system = template.turn_header("system") + template.default_system + template.end + template.separator
        opening += (
            f"{{% if not messages or messages[0]['role'] != 'system' %}}{{{{ {text(system)} }}}}{{% endif %}}"
        )
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
        f"{opening}{{% for message in messages %}}"
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
    ids: list[int] = _encode(tokenizer, template.prefix)
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for message in template.with_default_system(messages):
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
