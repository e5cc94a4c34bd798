"""Preference optimisation of a causal LM against a frozen reference: sigmoid DPO or paired KTO.

The policy is the stage's model (``model`` section or ``init_from``); the reference is frozen and, by
default, a copy of the policy as the stage starts (DPO's ``pi_ref = pi_SFT``, SAG's C-DPO). Set
``model.reference`` to use another model with the same vocabulary instead (LLaVA-MoD: the teacher).
Subclasses change where pairs come from (:meth:`CausalLMDPOTask.pairs`) or how reference log-probs
are obtained (:meth:`CausalLMDPOTask.reference_logps`).

Each pair renders as a user turn (the prompt) and an assistant turn (chosen or rejected) with the
stage's chat template; sequence log-probs sum over the assistant tokens only.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmfactory.config import ConfigError
from mmfactory.data.chat import (
    TemplateName,
    TokenizedChat,
    collate_chats,
    resolve_template,
    tokenize_chat,
)
from mmfactory.data.preference import preference_pairs
from mmfactory.data.source_config import SourceConfig, check_fraction
from mmfactory.losses.preference import dpo_loss, kto_pair_loss, sequence_logprobs
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from mmfactory.models.lora import LoraOptions, add_lora, save_and_merge
from mmfactory.tasks.base import StageContext, TrainingTask
from mmfactory.tasks.causal_lm import save_chat_tokenizer


@dataclass
class DPOModelConfig(CausalLMConfig):
    """The policy (the :class:`CausalLMConfig` fields, or the stage's ``init_from``) and its reference.

    ``reference``: ``None`` for a frozen copy of the policy's starting weights; otherwise a causal LM
    whose ``path`` may also name an earlier stage. It must share the policy's vocabulary.
    """

    reference: CausalLMConfig | None = None


@dataclass
class PreferenceDataConfig:
    """Text pairs from any ``preference`` sources (:mod:`mmfactory.data.sources`): the world
    (``kind: article_preference``: SAG C-DPO notes, faithful vs hallucinated styled article for a draft,
    languages in turn) or preference JSONL (``format: preference``). Samples with an image are refused:
    this task is text-only; so are unpaired KTO rows."""

    train: list[SourceConfig] = field(
        default_factory=lambda: [
            SourceConfig("world", kind="article_preference", size=1000, languages=["en", "zh"])
        ]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [
            SourceConfig("world", kind="article_preference", split="val", size=100, languages=["en", "zh"])
        ]
    )
    max_bad_fraction: float | None = None  # stop when a source has more bad records than this share
    max_length: int = 256  # tokens per prompt + reply; longer ones are right-truncated and counted
    template: TemplateName = "chatml"
    pad_to_multiple_of: int | None = None

    def validate(self) -> None:
        check_fraction(self.max_bad_fraction)


@dataclass
class DPOOptions:
    """The preference loss, an option group (``options.dpo`` of ``causal_lm_dpo``, ``sag_cdpo``, ...).

    ``loss``: ``sigmoid`` (DPO, Rafailov et al. 2023) or ``kto_pair`` (LLaVA-MoD's scripts).
    ``sft_weight`` adds that times the NLL of the chosen replies, averaged over their tokens in the
    micro-batch (RPO, Pang et al. 2024; TRL's ``rpo_alpha``): it keeps DPO from lowering the likelihood
    of the chosen replies along with that of the rejected ones.
    """

    loss: Literal["sigmoid", "kto_pair"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid only (conservative DPO)
    sft_weight: float = 0.0
    # kto_pair only: no gradient through the reference points (the KTO paper and TRL; LLaVA-MoD's
    # scripts use TRL's kto_pair, which does not detach them: false)
    detach_reference_point: bool = True

    def validate(self) -> None:
        if self.loss != "sigmoid" and self.label_smoothing:
            raise ConfigError("label_smoothing: only the sigmoid loss smooths labels")
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if self.loss != "kto_pair" and not self.detach_reference_point:
            raise ConfigError("detach_reference_point: only the kto_pair loss has reference points")


@dataclass
class CausalLMDPOOptions:
    """``causal_lm_dpo``: the loss (``dpo``) and LoRA on the policy (``lora``: only adapters train; without
    ``model.reference`` the reference is the policy with its adapters off, no second copy, as TRL does;
    final/ holds them merged, and alone in adapter/)."""

    dpo: DPOOptions = field(default_factory=DPOOptions)
    lora: LoraOptions | None = None


@dataclass
class TokenizedPair:
    chosen: TokenizedChat
    rejected: TokenizedChat


def load_frozen_lm(cfg: CausalLMConfig, ctx: StageContext) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM with ``requires_grad=False`` in eval mode; ``cfg.path`` may name an earlier stage."""
    init_dir = ctx.stage_outputs.get(cfg.path) if cfg.path is not None else None
    model, tokenizer = load_causal_lm(cfg, init_dir)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` summed log-probs of the labelled tokens of ``batch`` (``input_ids``/``labels`` ``[N, T]``)
    and ``[N]`` counts of those tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"])


def preference_objective(
    opts: DPOOptions, policy_logps: torch.Tensor, reference_logps: torch.Tensor, num_tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The DPO / KTO-pair loss of ``opts`` and its reward statistics.

    Args:
        policy_logps, reference_logps: ``[2B]`` sequence log-probs, the ``B`` chosen then the ``B`` rejected.
        num_tokens: ``[2B]`` reply tokens behind each log-prob (for the optional chosen NLL).
    """
    policy_chosen, policy_rejected = policy_logps.chunk(2)
    ref_chosen, ref_rejected = reference_logps.chunk(2)
    if opts.loss == "sigmoid":
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, opts.beta, opts.label_smoothing
        )
    else:
        loss, chosen_rewards, rejected_rewards = kto_pair_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, opts.beta, opts.detach_reference_point
        )
    metrics = {}
    if opts.sft_weight:
        nll_chosen = -policy_chosen.sum() / num_tokens.chunk(2)[0].sum().clamp(min=1)
        loss = loss + opts.sft_weight * nll_chosen
        metrics["nll_chosen"] = nll_chosen.detach()
    return {
        "loss": loss,
        **metrics,
        "reward_chosen": chosen_rewards.mean(),
        "reward_rejected": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps_chosen": policy_chosen.detach().mean(),
        "logps_rejected": policy_rejected.detach().mean(),
    }


class CausalLMDPOTask(TrainingTask):
    """Batches hold the ``B`` chosen rows then the ``B`` rejected rows: ``input_ids``, ``labels``,
    ``attention_mask`` of shape ``[2B, T]``; the loss averages over pairs."""

    model_config = DPOModelConfig
    data_config = PreferenceDataConfig
    options_config = CausalLMDPOOptions
    loss_unit = "pairs"
    sample_kind = "preference"

    def __init__(self, stage, ctx, model_cfg: DPOModelConfig, data_cfg, options: CausalLMDPOOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.model, self.tokenizer = load_causal_lm(model_cfg, ctx.resolve_init(stage.init_from))
        if options.lora is not None:
            self.model = add_lora(self.model, options.lora)
        self.reference = self.build_reference()
        self.template = resolve_template(data_cfg.template, self.tokenizer)
        self.counts: Counter[str] = Counter()
        self._datasets: dict[str, list[TokenizedPair]] = {}

    def build_reference(self) -> nn.Module | None:
        """The frozen reference: a copy of the starting policy, ``model.reference``, or None for a LoRA
        policy (its adapters switched off give the starting policy)."""
        if self.model_cfg.reference is None and isinstance(self.model, PeftModel):
            return None
        if self.model_cfg.reference is None:
            reference = copy.deepcopy(self.model)
            reference.requires_grad_(False)
            return reference.eval()
        reference, tokenizer = load_frozen_lm(self.model_cfg.reference, self.ctx)
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(
                "model.reference: its tokenizer's vocabulary differs from the policy's; DPO compares "
                "log-probs of the same token ids, so both models must share one vocabulary"
            )
        return reference

    def train(self, mode: bool = True) -> CausalLMDPOTask:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen: no dropout, whatever the loop asks of the policy
        return self

    # -- data ----------------------------------------------------------------------------------------
    def pairs(self, split: str) -> list[dict[str, str]]:
        """``[{"prompt", "chosen", "rejected"}]`` of ``split`` (``train`` or ``eval``)."""
        samples = self.read_sources(split, self.counts)
        return [] if samples is None else preference_pairs(samples, f"data.{split}", images=False)

    def _tokenized(self, split: str) -> list[TokenizedPair]:
        if split not in self._datasets:
            kept = []
            for pair in self.pairs(split):
                prompt = {"role": "user", "content": pair["prompt"]}
                chosen, rejected = (
                    tokenize_chat(
                        [prompt, {"role": "assistant", "content": pair[key]}],
                        self.tokenizer,
                        self.template,
                        self.data_cfg.max_length,
                    )
                    for key in ("chosen", "rejected")
                )
                self.counts[f"{split}/truncated"] += chosen.truncated or rejected.truncated
                if not (chosen.has_targets and rejected.has_targets):
                    self.counts[f"{split}/skipped_no_reply_tokens"] += 1  # truncation ate a whole reply
                    continue
                kept.append(TokenizedPair(chosen, rejected))
            self.counts[f"{split}/pairs"] = len(kept)
            self._datasets[split] = kept
        return self._datasets[split]

    def train_dataset(self) -> list[TokenizedPair]:
        return self._tokenized("train")

    def eval_dataset(self) -> list[TokenizedPair] | None:
        return self._tokenized("eval") or None

    def collate(self, samples: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        chats = [s.chosen for s in samples] + [s.rejected for s in samples]
        return collate_chats(chats, self.tokenizer.pad_token_id, self.data_cfg.pad_to_multiple_of)

    def data_report(self) -> dict[str, int]:
        return dict(self.counts)

    # -- math ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[2B]`` sequence log-probs under the frozen reference."""
        if self.reference is not None:
            return sequence_logps(self.reference, batch)[0]
        training = self.model.training
        self.model.eval()  # the reference runs without dropout, as a separate frozen copy would
        try:
            with self.model.disable_adapter():
                return sequence_logps(self.model, batch)[0]
        finally:
            self.model.train(training)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        policy_logps, num_tokens = sequence_logps(self.model, batch)
        return preference_objective(self.options.dpo, policy_logps, self.reference_logps(batch), num_tokens)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    # -- output --------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: Path) -> None:
        if self.options.lora is not None:
            self.model = save_and_merge(self.model, out_dir)
        self.model.save_pretrained(out_dir)
        save_chat_tokenizer(self.tokenizer, self.data_cfg.template, out_dir)
