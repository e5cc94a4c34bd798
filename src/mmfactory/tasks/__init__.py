"""Task lookup: an explicit table from a stage's ``task`` name to its class (no global registry)."""

from __future__ import annotations

import difflib
import importlib

from mmfactory.config import EXACTLY_ONE_LENGTH, ConfigError, StageConfig, from_dict
from mmfactory.data.sources import check_kinds
from mmfactory.tasks.base import StageContext, TrainingTask

# task name -> "module:Class", imported on use so a recipe only pays for the tasks it runs.
TASKS: dict[str, str] = {
    "causal_lm_sft": "mmfactory.tasks.causal_lm:CausalLMSFTTask",
    "causal_lm_dpo": "mmfactory.tasks.preference:CausalLMDPOTask",
    "sag_stylist_sft": "mmfactory.tasks.sag:SAGStylistSFTTask",
    "sag_cdpo": "mmfactory.tasks.sag:SAGContentDPOTask",
    "sag_self_improve": "mmfactory.tasks.sag:SAGSelfImproveTask",
    "mllm_sft": "mmfactory.tasks.mllm:MultimodalSFTTask",
    "av_sft": "mmfactory.tasks.av_llm:AudioVisualSFTTask",
    "mllm_mimic_distill": "mmfactory.tasks.llava_mod:MimicDistillTask",
    "mllm_preference_distill": "mmfactory.tasks.llava_mod:PreferenceDistillTask",
    "video_text_contrastive": "mmfactory.tasks.contrastive:VideoTextContrastiveTask",
    "image_text_contrastive": "mmfactory.tasks.image_text:ImageTextContrastiveTask",
    "image_text_reward": "mmfactory.tasks.reward:ImageTextRewardTask",
    "image_text_matching": "mmfactory.tasks.matching:ImageTextMatchingTask",
    "pool_filter": "mmfactory.tasks.pool_filter:PoolFilterTask",
    "arm_pretrain": "mmfactory.tasks.arm:ARMPretrainTask",
    "arm_mae_pretrain": "mmfactory.tasks.arm:MaskedPretrainTask",
    "arm_finetune": "mmfactory.tasks.arm:ImageClassificationTask",
    "mars_vq": "mmfactory.tasks.image_tokenizer:VQTokenizerTask",
    "mars_judge": "mmfactory.tasks.scene_judge:SceneJudgeTask",
    "mars_t2i": "mmfactory.tasks.mars:T2ITask",
    "t2i_diffusion": "mmfactory.tasks.diffusion_t2i:DiffusionT2ITask",
}


def task_class(name: str, where: str = "task") -> type[TrainingTask]:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known tasks: {', '.join(sorted(TASKS))})"
        raise ConfigError(f"{where}: unknown task {name!r}{hint}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def validate_stage(stage: StageConfig, index: int) -> tuple[type[TrainingTask], object, object, object]:
    """Check the stage's task-specific sections against the task's schemas (before anything runs)."""
    cls = task_class(stage.task, f"stages[{index}].task")
    if cls.trains and stage.train.max_steps is None and stage.train.epochs is None:
        raise ConfigError(f"stages[{index}].train.{EXACTLY_ONE_LENGTH}")
    model_cfg = from_dict(cls.model_config, stage.model, f"stages[{index}].model")
    data_cfg = from_dict(cls.data_config, stage.data, f"stages[{index}].data")
    options = from_dict(cls.options_config, stage.options, f"stages[{index}].options")
    kinds = {"train": cls.sample_kind, "eval": cls.sample_kind} if cls.sample_kind else {}
    for name, kind in {**kinds, **cls.extra_sources}.items():
        check_kinds(getattr(data_cfg, name) or [], kind, f"stages[{index}].data.{name}")
    return cls, model_cfg, data_cfg, options


def build_task(stage: StageConfig, index: int, ctx: StageContext) -> TrainingTask:
    cls, model_cfg, data_cfg, options = validate_stage(stage, index)
    return cls(stage, ctx, model_cfg, data_cfg, options)
