"""LoRA (peft) on any transformers model: add the adapters, and at the end of a stage save them alone
(``final/adapter/``) and merge them into the weights that ``final/`` holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from mmfactory.config import ConfigError

ADAPTER_DIR = "adapter"  # inside final/: adapter_config.json + adapter_model.safetensors (peft's format)


@dataclass
class LoraOptions:
    """LoRA adapters on ``target_modules`` (Hu et al. 2021); peft freezes the weights they adapt."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("target_modules: name at least one module")


def add_lora(model: PreTrainedModel, options: LoraOptions) -> PeftModel:
    """``model`` wrapped with fresh adapters (B = 0, so outputs are unchanged); only adapters train."""
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
    )
    return get_peft_model(model, config)


def save_and_merge(model: PeftModel, out_dir: Path) -> PreTrainedModel:
    """Write the adapters alone to ``out_dir/adapter`` and return the base model with them merged in."""
    model.save_pretrained(out_dir / ADAPTER_DIR)
    return model.merge_and_unload()
