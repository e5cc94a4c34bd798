"""A LLaVA-style multimodal LM: vision tower -> projector -> placeholder positions of a causal LM.

    pixel_values [N, 3, H, W] --vision_tower--> hidden_states[vision_feature_layer] [N, 1 + P, Dv]
        --drop CLS ("patch")--> [N, P, Dv] --projector--> [N, P, D]
    input_ids [B, T] (each <image> already expanded to P placeholder tokens by the data layer)
        --embed--> [B, T, D] --fill the placeholders in order--> --language_model--> logits [B, T, V]

The parts are Hugging Face models (``CLIPVisionModel`` / ``SiglipVisionModel``, any
``AutoModelForCausalLM``), so a tiny config and a real checkpoint take the same road, and the whole model
round-trips through ``save_pretrained`` / ``MultimodalLM.from_pretrained`` (safetensors; the config and
model are also registered with ``AutoConfig`` / ``AutoModel``). :func:`merge_modal_embeddings` is generic
over placeholder tokens, so audio or video encoders plug in the same way. A dense model with an
``mlp2x_gelu`` projector exports to transformers' ``LlavaForConditionalGeneration`` (:func:`export_llava`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub.dataclasses import strict
from tokenizers import AddedToken
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.image_processing_utils import BaseImageProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmfactory.config import ConfigError, from_dict, to_dict
from mmfactory.data.chat import chat_template_jinja
from mmfactory.data.multimodal import IMAGE_TOKEN, MultimodalProcessor
from mmfactory.models.components.hyper import VisualExpertProjector
from mmfactory.models.components.moe import UPCYCLING_CONFIG_KEY, decoder_layers, moe_blocks, upcycle
from mmfactory.models.components.projector import build_projector, projector_depth
from mmfactory.models.hyperllava import HyperExpertsConfig, LanguageExperts
from mmfactory.models.lm import DTYPES, CausalLMConfig, load_causal_lm
from mmfactory.models.vision import (
    VisionTowerConfig,
    has_cls_token,
    load_image_processor,
    load_vision_tower,
    num_patches,
)


class PlaceholderMismatchError(ValueError):
    """The placeholder tokens of a batch do not line up with the encoder features meant to fill them."""


def _check_placeholders(per_sample: list[int], lengths: list[int], name: str) -> None:
    """Items fill the placeholders in reading order: the totals must agree, and every sample must end on an
    item boundary (hold whole items)."""
    num_features = sum(lengths)
    boundaries = set(accumulate(lengths, initial=0))
    bad = next((i for i, end in enumerate(accumulate(per_sample)) if end not in boundaries), None)
    if sum(per_sample) == num_features and bad is None:
        return
    count = f"{len(lengths)} item{'s' * (len(lengths) != 1)}"
    if not lengths:
        items = "no items"
    elif len(set(lengths)) == 1:
        items = f"{count} x {lengths[0]} tokens"
    else:
        items = f"{count} of {lengths} tokens"
    where = ""
    if bad is not None and sum(per_sample[: bad + 1]) > num_features:
        where = f"; the features run out in sample {bad}"
    elif bad is not None:
        where = f"; sample {bad} holds {per_sample[bad]} of them, not a whole number of items"
    raise PlaceholderMismatchError(
        f"{name} placeholders and features disagree: the batch has {sum(per_sample)} placeholder tokens "
        f"(per sample: {per_sample}) for {items} = {num_features} feature vectors{where}. Each {name} must "
        "be expanded to as many tokens as its item has feature vectors, and no sequence may be truncated "
        "through a span."
    )


def merge_modal_embeddings(
    inputs_embeds: Tensor,
    input_ids: Tensor,
    features: Mapping[int, Tensor | Sequence[Tensor]],
    names: Mapping[int, str] | None = None,
) -> Tensor:
    """Fill the placeholder positions of each modality with its encoder features (out of place).

    Args:
        inputs_embeds: ``[B, T, D]`` token embeddings.
        input_ids: ``[B, T]``; an item (image, audio clip, ...) occupies as many consecutive placeholder
            tokens as it has feature vectors.
        features: placeholder token id -> the items' features in reading order (sample 0 first):
            ``[N, P, D]`` or a list of ``N`` tensors ``[P_i, D]``.
        names: placeholder token id -> a readable name (``"<image>"``) for error messages.
    Returns:
        ``[B, T, D]``; gradients flow to both the text embeddings and the features.
    Raises:
        PlaceholderMismatchError: the count of placeholders differs from the count of feature vectors, or
            a sample holds part of an item; the message gives the counts per sample.
    """
    for token_id, items in features.items():
        lengths = [len(item) for item in items]
        mask = input_ids == token_id
        name = (names or {}).get(token_id, f"token id {token_id}")
        _check_placeholders(mask.sum(dim=1).tolist(), lengths, name)
        if not lengths:
            continue
        flat = items.flatten(0, 1) if isinstance(items, Tensor) else torch.cat(list(items))
        inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat.to(inputs_embeds.dtype))
    return inputs_embeds


@strict
class MultimodalLMConfig(PreTrainedConfig):
    """Configuration of :class:`MultimodalLM`.

    Args:
        vision_config: the vision tower's config (``clip_vision_model`` or ``siglip_vision_model``).
        text_config: the causal LM's config (any ``AutoModelForCausalLM`` type).
        projector_type: ``linear`` or ``mlp{N}x_gelu`` (LLaVA-1.5: ``mlp2x_gelu``).
        vision_feature_layer: which hidden state of the tower feeds the projector (LLaVA: -2, the
            penultimate layer's output).
        vision_feature_select: ``patch`` drops the CLS token (LLaVA's ``default``; towers without one
            keep all), ``full`` keeps it.
        image_token: the placeholder text in conversations; ``image_token_id`` its token id.
        hyper: HyperLLaVA's experts (a :class:`~mmfactory.models.hyperllava.HyperExpertsConfig` as a
            dict), or None for a static model.
    """

    model_type = "mmfactory_mllm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select: Literal["patch", "full"] = "patch"
    image_token: str = IMAGE_TOKEN
    image_token_id: int | None = None
    hyper: dict | None = None

    @property
    def hyper_experts(self) -> HyperExpertsConfig | None:
        return None if self.hyper is None else from_dict(HyperExpertsConfig, self.hyper, "hyper")

    @property
    def drops_cls(self) -> bool:
        return self.vision_feature_select == "patch" and has_cls_token(self.vision_config)

    @property
    def num_image_tokens(self) -> int:
        """``P``: placeholder tokens (= projected feature vectors) per image."""
        return num_patches(self.vision_config) + int(has_cls_token(self.vision_config) and not self.drops_cls)


class MultimodalLM(PreTrainedModel):
    """Vision tower + projector + causal LM (see the module docstring).

    ``vision_tower`` and ``language_model`` may be passed in already built (e.g. loaded from checkpoints);
    otherwise they are built from ``config``, the LM upcycled to sparse MoE when its config records
    ``moe_upcycling`` (so a saved LLaVA-MoD student loads with ``from_pretrained``). Submodules:
    ``vision_tower``, ``projector``, ``language_model`` (so stage patterns read ``model.projector.*``,
    ``model.language_model.*``), and with HyperLLaVA's experts (``config.hyper``) a projector holding the
    visual expert and ``language_expert`` (:mod:`mmfactory.models.hyperllava`).
    """

    config_class = MultimodalLMConfig
    config: MultimodalLMConfig
    base_model_prefix = "mllm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    media_inputs: tuple[str, ...] = ()  # forward / generate keywords of other modalities, for embed_inputs
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(
        self,
        config: MultimodalLMConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_tower = (
            vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        )
        self.projector = build_projector(
            config.projector_type, config.vision_config.hidden_size, config.text_config.hidden_size
        )
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
            upcycling = getattr(config.text_config, UPCYCLING_CONFIG_KEY, None)
            if upcycling is not None:  # a saved LLaVA-MoD student: rebuild its MoE layers before loading
                upcycle(language_model, **upcycling)
        self.language_model = language_model
        self.language_expert: LanguageExperts | None = None
        # One config object per part, shared with the part (from_config may copy; resizing edits the LM's),
        # and the attention implementation resolved for the whole model where a part has none.
        config.vision_config, config.text_config = self.vision_tower.config, self.language_model.config
        for part in (config.vision_config, config.text_config):
            if part._attn_implementation is None:
                part._attn_implementation = config._attn_implementation
        self.post_init()
        if config.hyper is not None:  # after post_init, which would re-initialise the zeroed up-projections
            _attach_experts(self, config.hyper_experts)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_input_embeddings()

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``[N, 3, H, W]`` -> projected visual tokens ``[N, P, D]``."""
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        features = hidden[self.config.vision_feature_layer]  # [N, 1 + P, Dv] (CLIP) or [N, P, Dv]
        if self.config.drops_cls:
            features = features[:, 1:]
        return self.projector(features)

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """``[B, T]`` ids (+ ``[N, 3, H, W]`` images, reading order) -> ``[B, T, D]`` LM input embeddings."""
        embeds = self.get_input_embeddings()(input_ids)
        has_images = pixel_values is not None and len(pixel_values) > 0
        features = self.encode_images(pixel_values) if has_images else []
        token_id = self.config.image_token_id
        return merge_modal_embeddings(
            embeds, input_ids, {token_id: features}, {token_id: self.config.image_token}
        )

    def _pop_media(self, kwargs: dict) -> dict:
        """The inputs of the other modalities (:attr:`media_inputs`) taken out of ``kwargs`` for
        :meth:`embed_inputs`; the rest go to the LM."""
        return {name: kwargs.pop(name) for name in self.media_inputs if name in kwargs}

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:  # gradient_checkpointing_enable too
        if self.language_expert is not None:  # the recompute runs after ``guided`` has dropped the guidance
            raise ValueError(
                "gradient checkpointing recomputes decoder layers without HyperLLaVA's guidance; train "
                "a model with language experts without it"
            )
        super().activation_checkpointing_enable(*args, **kwargs)

    def guided(self, mask: Tensor | None, hold: bool = False):
        """The language experts' guidance context (:meth:`LanguageExperts.guided`); a no-op without them."""
        return nullcontext() if self.language_expert is None else self.language_expert.guided(mask, hold)

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        guidance_mask: Tensor | None = None,
        **lm_kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``[B, T, V]`` (the LM's output); the task owns the loss.

        ``guidance_mask [B, T]``: the tokens the language experts' guidance pools over (training: the prompt,
        :func:`~mmfactory.models.hyperllava.prompt_mask`); default ``attention_mask``.
        """
        if self.training and self.language_expert is not None and guidance_mask is None:
            raise ValueError(
                "a model with language experts trains with guidance_mask (the prompt's tokens, prompt_mask): "
                "pooled over every token, the guidance would see the response"
            )
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, **self._pop_media(lm_kwargs))
        with self.guided(guidance_mask if guidance_mask is not None else attention_mask):
            return self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **lm_kwargs
            )

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None, **generate_kwargs
    ) -> Tensor:
        """New tokens ``[B, T_new]`` after left-padded prompts ``[B, T]``, via the LM's ``generate``."""
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, **self._pop_media(generate_kwargs))
        with self.guided(attention_mask, hold=True):  # the prompt's guidance for every new token
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
            )


def _attach_experts(model: MultimodalLM, hyper: HyperExpertsConfig) -> None:
    if hyper.visual is not None:
        model.projector = VisualExpertProjector(model.projector, hyper.visual, hyper.visual.place)
    if hyper.language is not None:
        lm = model.language_model
        model.language_expert = LanguageExperts(decoder_layers(lm), lm.config.hidden_size, hyper.language)
    model.to(device=model.device, dtype=model.dtype)


def add_hyper_experts(model: MultimodalLM, hyper: HyperExpertsConfig) -> MultimodalLM:
    """Give a (trained) model the experts of ``hyper`` it lacks, fresh (their outputs start at zero, so its
    outputs are unchanged); experts it already has must be configured the same. In place; ``model``."""
    have = model.config.hyper_experts or HyperExpertsConfig(visual=None, language=None)
    new = HyperExpertsConfig(visual=None, language=None)
    for part in ("visual", "language"):
        wanted, present = getattr(hyper, part), getattr(have, part)
        if wanted is not None and present is not None and wanted != present:
            raise ConfigError(
                f"model.hyper.{part}: the init_from model already has a {part} expert configured as "
                f"{to_dict(present)}; drop model.hyper.{part} or configure it the same"
            )
        if wanted is not None and present is None:
            setattr(new, part, wanted)
    _attach_experts(model, new)
    merged = {part: getattr(have, part) or getattr(new, part) for part in ("visual", "language")}
    model.config.hyper = to_dict(HyperExpertsConfig(**merged))
    return model


AutoConfig.register(MultimodalLMConfig.model_type, MultimodalLMConfig)
AutoModel.register(MultimodalLMConfig, MultimodalLM)


# --------------------------------------------------------------------------------------------------
# Building from parts
# --------------------------------------------------------------------------------------------------


@dataclass
class MultimodalLMSpec:
    """How to assemble a :class:`MultimodalLM` from parts (a stage's ``model`` section).

    ``vision`` and ``lm`` say where the tower and the LM come from (tiny configs or local checkpoints;
    the LM also from GGUF); leave both empty when the stage has ``init_from`` (a saved MultimodalLM).
    ``lm.dtype`` is the dtype of the whole model. ``hyper`` adds HyperLLaVA's experts (with ``init_from``:
    the ones the loaded model lacks, see :func:`add_hyper_experts`).
    """

    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    lm: CausalLMConfig = field(default_factory=CausalLMConfig)
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select: Literal["patch", "full"] = "patch"
    image_token: str = IMAGE_TOKEN
    hyper: HyperExpertsConfig | None = None

    def validate(self) -> None:
        try:
            projector_depth(self.projector_type)
        except ValueError as err:
            raise ConfigError(f"projector_type: {err}") from None

    @property
    def has_parts(self) -> bool:
        return any(v is not None for v in (self.vision.path, self.vision.tiny, self.lm.path, self.lm.tiny))


def add_placeholder_token(
    tokenizer: PreTrainedTokenizerBase, language_model: PreTrainedModel, token: str = IMAGE_TOKEN
) -> int:
    """Add ``token`` as a special token if the tokenizer lacks it, grow the LM's embeddings; its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(token)


def build_multimodal_lm(
    spec: MultimodalLMSpec,
) -> tuple[MultimodalLM, PreTrainedTokenizerBase, BaseImageProcessor]:
    """``(model, tokenizer, image_processor)`` assembled from a tower, a fresh projector and an LM.

    The image processor is the tower folder's own when it has one, else CLIP's at the tower's size.
    """
    tower, language_model, tokenizer, config = load_multimodal_parts(spec)
    model = MultimodalLM(config, vision_tower=tower, language_model=language_model).to(tower.dtype)
    return model, tokenizer, load_image_processor(spec.vision.path, tower.config.image_size)


def load_multimodal_parts(
    spec: MultimodalLMSpec, config_class: type[MultimodalLMConfig] = MultimodalLMConfig, **config_kwargs
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase, MultimodalLMConfig]:
    """``(vision tower, LM, tokenizer, config)`` for a model of ``config_class`` (extra fields in
    ``config_kwargs``); the image placeholder is added to the tokenizer."""
    if spec.vision.path is None and spec.vision.tiny is None:
        raise ConfigError("model.vision: set vision.path or vision.tiny (or the stage's init_from)")
    dtype = DTYPES[spec.lm.dtype]
    language_model, tokenizer = load_causal_lm(spec.lm)
    tower = load_vision_tower(spec.vision, dtype).to(dtype)
    config = config_class(
        vision_config=tower.config,
        text_config=language_model.config,
        projector_type=spec.projector_type,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select=spec.vision_feature_select,
        image_token=spec.image_token,
        image_token_id=add_placeholder_token(tokenizer, language_model, spec.image_token),
        hyper=None if spec.hyper is None else to_dict(spec.hyper),
        # a config's attn_implementation is set on its sub-configs too, which are the parts' own: keep
        # theirs (the LM's is spec.lm.attn_implementation's) rather than reset them to the default
        attn_implementation={
            "vision_config": tower.config._attn_implementation,
            "text_config": language_model.config._attn_implementation,
        },
        **config_kwargs,
    )
    return tower, language_model.to(dtype), tokenizer, config


# --------------------------------------------------------------------------------------------------
# Export to transformers' LLaVA
# --------------------------------------------------------------------------------------------------


def llava_state_dict(model: MultimodalLM) -> dict[str, Tensor]:
    """The weights of ``model`` under ``LlavaForConditionalGeneration``'s names."""
    base = model.language_model.base_model_prefix  # "model" for Llama / Qwen2 / Mistral ...
    renames = [
        (f"language_model.{base}.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("projector.0.", "model.multi_modal_projector.linear_1."),
        ("projector.2.", "model.multi_modal_projector.linear_2."),
    ]
    state = {}
    for name, tensor in model.state_dict().items():
        old, new = next(((o, n) for o, n in renames if name.startswith(o)), (None, None))
        if old is None:
            raise ValueError(f"cannot map {name!r} to LLaVA: is the language model a plain causal LM?")
        state[new + name[len(old) :]] = tensor
    return state


def export_llava(
    model: MultimodalLM, processor: MultimodalProcessor, out_dir: str | Path
) -> LlavaForConditionalGeneration:
    """Write ``model`` as a transformers ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` folder.

    Only a dense model with an ``mlp2x_gelu`` projector has a LLaVA equivalent (LoRA must be merged
    first). The LLaVA model computes the same logits on the same inputs, and the processor (with a chat
    template rendering conversations as ``processor`` does) produces the same ids and pixels (tested).
    """
    cfg = model.config
    if moe_blocks(model):
        raise ValueError("LLaVA has no MoE layers: only a dense MultimodalLM exports to LLaVA")
    if cfg.hyper is not None:
        raise ValueError("LLaVA has no HyperLLaVA experts: only a static MultimodalLM exports to LLaVA")
    if cfg.projector_type != "mlp2x_gelu":
        raise ValueError(f"LLaVA's projector is mlp2x_gelu; this model's is {cfg.projector_type!r}")
    strategy = "default" if cfg.drops_cls else "full"
    llava_config = LlavaConfig(
        vision_config=cfg.vision_config.to_dict(),
        text_config=cfg.text_config.to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.text_config.tie_word_embeddings,
    )
    llava = LlavaForConditionalGeneration(llava_config).to(model.dtype)
    llava.load_state_dict(llava_state_dict(model), strict=True)
    # Replies were trained to end with the template's end-of-turn token: make it the EOS that generate()
    # and evaluation harnesses (lmms-eval stops at the tokenizer's EOS) stop at.
    tokenizer = copy.deepcopy(processor.tokenizer)
    end_ids = tokenizer.encode(processor.template.end, add_special_tokens=False)
    if len(end_ids) == 1:
        tokenizer.eos_token = processor.template.end
        llava.generation_config.eos_token_id = end_ids[0]
    llava.save_pretrained(out_dir)
    LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(has_cls_token(cfg.vision_config)),
        image_token=cfg.image_token,
        chat_template=chat_template_jinja(processor.template, cfg.image_token),
    ).save_pretrained(out_dir)
    return llava
