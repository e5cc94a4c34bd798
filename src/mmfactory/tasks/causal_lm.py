"""Causal-LM supervised fine-tuning on chat conversations, loss on assistant tokens only.

Used by ``lm/tiny`` and reused by SAG (the stylist) and the MLLM recipes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mmfactory.config import ConfigError
from mmfactory.data.chat import (
    IGNORE_INDEX,
    TemplateName,
    TokenizedChat,
    chat_template_jinja,
    collate_chats,
    resolve_template,
    tokenize_chat,
)
from mmfactory.data.source_config import SourceConfig, check_sources
from mmfactory.data.streaming import SampleStream, TrainStream
from mmfactory.losses.lm import causal_lm_loss
from mmfactory.models.generation import GenerationConfig, generate_replies
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from mmfactory.models.lora import LoraOptions, add_lora, save_and_merge
from mmfactory.tasks.base import TrainingTask

CHAT_META = "mmfactory_chat.json"  # written next to the model: which template it was trained with


def save_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, template: TemplateName, out_dir: Path) -> None:
    """The tokenizer with the trained template as its ``chat_template`` (what ``apply_chat_template`` and
    serving engines render), and :data:`CHAT_META` naming the template."""
    tokenizer.chat_template = chat_template_jinja(resolve_template(template, tokenizer))
    tokenizer.save_pretrained(out_dir)
    (out_dir / CHAT_META).write_text(json.dumps({"template": template}))


@dataclass
class ChatDataConfig:
    """Text-only conversations from any ``chat`` sources (:mod:`mmfactory.data.sources`): the built-in
    world (``kind: chat``), chat / messages / ShareGPT / alpaca files."""

    train: list[SourceConfig] = field(default_factory=lambda: [SourceConfig("world", kind="chat", size=2000)])
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="chat", split="val", size=200)]
    )
    max_bad_fraction: float | None = None  # stop when a source has more bad records than this share
    max_length: int = 256  # tokens; longer conversations are right-truncated and counted
    template: TemplateName = "chatml"
    pad_to_multiple_of: int | None = None

    def validate(self) -> None:
        check_sources(self.train, self.max_bad_fraction)


@dataclass
class ChatEvalOptions:
    """What a chat LM's evaluation measures: ``eval_exact_match``, the share of the first ``generate`` eval
    conversations (those ending with an assistant turn) whose last reply, generated greedily from the turns
    before it (at most ``max_new_tokens``), equals the reference reply. ``generate: 0`` skips it."""

    generate: int = 64
    max_new_tokens: int = 48

    def validate(self) -> None:
        if self.generate < 0:
            raise ConfigError(f"generate: must be >= 0 (0: no generation), got {self.generate}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")


@dataclass
class SFTOptions:
    """``causal_lm_sft``: the evaluation (``eval``) and LoRA (``lora``: adapters only train; final/ holds
    them merged, and alone in adapter/)."""

    eval: ChatEvalOptions = field(default_factory=ChatEvalOptions)
    lora: LoraOptions | None = None


class CausalLMSFTTask(TrainingTask):
    model_config = CausalLMConfig
    data_config = ChatDataConfig
    options_config = SFTOptions
    loss_unit = "tokens"
    sample_kind = "chat"

    def __init__(self, stage, ctx, model_cfg: CausalLMConfig, data_cfg: ChatDataConfig, options: SFTOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.model, self.tokenizer = load_causal_lm(model_cfg, ctx.resolve_init(stage.init_from))
        if options.lora is not None:
            self.model = add_lora(self.model, options.lora)
        self.template = resolve_template(data_cfg.template, self.tokenizer)
        self.counts: Counter[str] = Counter()
        self._datasets: dict[str, list[TokenizedChat]] = {}
        self._conversations: dict[str, list[list[dict[str, str]]]] = {}
        self._train_stream: SampleStream | None = None

    # -- data ----------------------------------------------------------------------------------------
    def conversations(self, split: str) -> list[list[dict[str, str]]]:
        if split not in self._conversations:
            source = self.read_sources(split, self.counts)
            self._conversations[split] = [] if source is None else source.messages
        return self._conversations[split]

    def _tokenized(self, split: str) -> list[TokenizedChat]:
        if split not in self._datasets:
            kept = []
            for messages in self.conversations(split):
                sample = tokenize_chat(messages, self.tokenizer, self.template, self.data_cfg.max_length)
                self.counts[f"{split}/truncated"] += sample.truncated
                if not sample.has_targets:
                    # Truncation removed every reply token: nothing to learn, counted not hidden.
                    self.counts[f"{split}/skipped_no_reply_tokens"] += 1
                    continue
                kept.append(sample)
            self.counts[f"{split}/samples"] = len(kept)
            self._datasets[split] = kept
        return self._datasets[split]

    def train_dataset(self) -> list[TokenizedChat] | TrainStream:
        stream = self._stream()
        return self._tokenized("train") if stream is None else TrainStream(stream, self._stream_item)

    def _stream(self) -> SampleStream | None:
        """The training stream, when the train source is streamed (``conversations`` is then not used)."""
        if self._train_stream is None and any(source.streaming for source in self.data_cfg.train):
            self._train_stream = self.read_sources("train", self.counts)
        return self._train_stream

    def _stream_item(self, sample: dict, rng) -> TokenizedChat | None:
        chat = tokenize_chat(sample["messages"], self.tokenizer, self.template, self.data_cfg.max_length)
        self.counts["train/truncated"] += chat.truncated
        if not chat.has_targets:
            self.counts["train/skipped_no_reply_tokens"] += 1
            return None
        return chat

    def train_lengths(self) -> list[int] | None:
        if self._stream() is not None:
            return None  # a stream's lengths are not known before it is read
        return [-len(chat.input_ids) for chat in self._tokenized("train")]  # text-only

    def eval_dataset(self) -> list[TokenizedChat] | None:
        return self._tokenized("eval") or None

    def collate(self, samples: list[TokenizedChat]) -> dict[str, torch.Tensor]:
        return collate_chats(samples, self.tokenizer.pad_token_id, self.data_cfg.pad_to_multiple_of)

    def data_report(self) -> dict[str, int]:
        return dict(self.counts)

    # -- math ----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = causal_lm_loss(logits, batch["labels"])
        return {"loss": loss}

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # -- evaluation and output -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy replies to held-out conversations: exact-match rate of the last assistant turn."""
        convs = [c for c in self.conversations("eval") if c and c[-1]["role"] == "assistant"]
        convs = convs[: self.options.eval.generate]
        if not convs:
            return {}
        replies = generate_replies(
            self.model,
            self.tokenizer,
            self.template,
            [c[:-1] for c in convs],
            GenerationConfig(max_new_tokens=self.options.eval.max_new_tokens),
        )
        hits = sum(reply == c[-1]["content"].strip() for reply, c in zip(replies, convs, strict=True))
        return {"eval_exact_match": hits / len(convs)}

    def save_pretrained(self, out_dir: Path) -> None:
        if self.options.lora is not None:
            self.model = save_and_merge(self.model, out_dir)
        self.model.save_pretrained(out_dir)
        save_chat_tokenizer(self.tokenizer, self.data_cfg.template, out_dir)
