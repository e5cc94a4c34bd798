"""The one training loop: accelerate for processes and precision, everything else explicit.

It never names a method. A :class:`~mmfactory.tasks.base.TrainingTask` supplies data, the loss and its
evaluation; the loop does sampling, gradient accumulation (weighted so 1x8 == 8x1), clipping, schedules,
mixed precision, NaN/inf guarding, periodic evaluation, atomic checkpoints with exact resume, metrics
(``metrics.jsonl``, tensorboard and whatever else ``train.report_to`` names: :mod:`mmfactory.train.trackers`)
and a progress bar. DDP and FSDP2 come from accelerate's launch configuration, never from task code; what
FSDP2 changes (gathered checkpoints, an unsharded copy to evaluate and save) is in
:mod:`mmfactory.train.sharded`.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from mmfactory.config import ConfigError, StageConfig
from mmfactory.data.streaming import TrainStream
from mmfactory.tasks.base import TrainingTask
from mmfactory.train import checkpoint as ckpt
from mmfactory.train import sharded
from mmfactory.train.ema import WeightEMA
from mmfactory.train.optim import build_optimizer, build_scheduler, select_trainable
from mmfactory.train.sampler import StepSampler
from mmfactory.train.trackers import MetricsLog


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the stage and step."""


class _StepBatches:
    """``batch_sampler`` for a DataLoader: the sampler's micro-batches from a global step on."""

    def __init__(self, sampler: StepSampler, start_step: int):
        self.sampler, self.start_step = sampler, start_step

    def __iter__(self):
        return self.sampler.micro_batches(self.start_step)


def _input_tokens(batch: Any) -> int:
    """Non-padding input tokens of a token batch (``attention_mask`` or ``input_ids``), else 0."""
    if isinstance(batch, dict):
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"].numel()
    return 0


def _check_finite(parameters: list[torch.Tensor], stage: str, step: int, accelerator: Accelerator) -> None:
    """Every process checks its part (its shards under FSDP); all stop together if any part is not finite."""
    local_bad = sum(int(not torch.isfinite(sharded.local(p)).all()) for p in parameters)
    bad = int(accelerator.reduce(torch.tensor(local_bad, device=accelerator.device), "sum").item())
    if bad:
        raise NonFiniteLossError(
            f"[{stage}] {bad} trainable tensors hold inf or NaN after step {step}; nothing was saved "
            "(lower the learning rate, or clip gradients with train.max_grad_norm)"
        )


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _gather_rng(accelerator: Accelerator) -> list[tuple[dict, dict]]:
    """Every process's RNG state (on every process), for a checkpoint written by the main one."""
    local = ckpt.rng_state()
    if accelerator.num_processes == 1:
        return [local]
    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, local)
    return out


NON_REENTRANT = {"use_reentrant": False}  # no input gradients needed, so frozen embeddings are fine


def enable_gradient_checkpointing(task: nn.Module, stage: StageConfig) -> list[str]:
    """Turn on activation checkpointing (non-reentrant) in every outermost Hugging Face model of ``task``
    that supports it, and return them as ``"path (class)"``. A model nested in one that was switched on
    (the LM inside a :class:`~mmfactory.models.mllm.MultimodalLM`) is covered by it; one inside a model
    without support (or inside a plain module, such as PEFT's wrapper) is looked for. Refuses with a
    :class:`ConfigError` naming ``stages.NAME.train.gradient_checkpointing`` when no model supports it, or
    when one refuses it (HyperLLaVA's language experts), so a stage never trains silently without it.

    Layers checkpoint only in training mode with gradients on, so evaluation and generation (eval mode, no
    grad) keep their KV cache; transformers drops the cache of a checkpointed forward itself.
    """
    where = f"stages.{stage.name}.train.gradient_checkpointing"
    enabled: list[str] = []
    unsupported: list[str] = []

    def visit(path: str, module: nn.Module) -> None:
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            try:
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
            except ValueError as err:
                message = " ".join(str(err).split())
                raise ConfigError(f"{where}: {path} ({type(module).__name__}): {message}") from None
            enabled.append(f"{path} ({type(module).__name__})")
            return
        if isinstance(module, PreTrainedModel):
            unsupported.append(type(module).__name__)
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", task)
    if not enabled:
        models = ", ".join(sorted(set(unsupported))) or "none"
        raise ConfigError(
            f"{where}: no model of task {stage.task} supports activation checkpointing (its Hugging Face "
            f"models: {models}); set it to false"
        )
    return enabled


@torch.no_grad()
def evaluate_loss(task: TrainingTask, accelerator: Accelerator, batch_size: int) -> dict:
    """Item-weighted mean of the task's loss and metrics over its eval set, sharded across processes.

    Calls the unwrapped task (accelerate patches its autocast onto it). Every process runs the same number
    of batches, one that has run out repeating its first with weight 0: under FSDP every forward gathers
    shards from all processes, so none may skip one.
    """
    dataset = task.eval_dataset()
    if dataset is None:
        return {}
    was_training = task.training
    task.eval()
    world = accelerator.num_processes
    indices = list(range(accelerator.process_index, len(dataset), world))
    batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    sums: dict[str, torch.Tensor] = {}
    weight = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for b in range(batches):
        chunk = indices[b * batch_size : (b + 1) * batch_size]
        batch = task.collate([dataset[i] for i in chunk or indices[:1] or [0]])
        w = task.loss_weight(batch) if chunk else 0
        out = task(_to_device(batch, accelerator.device))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double() * w
        weight += w
    task.train(was_training)
    total = accelerator.reduce(weight, "sum")
    return {f"eval_{k}": (accelerator.reduce(v, "sum") / total).item() for k, v in sorted(sums.items())}


def train_stage(
    task: TrainingTask,
    stage: StageConfig,
    stage_dir: Path,
    accelerator: Accelerator,
    trackers: Sequence[GeneralTracker] = (),
    rebuild: Callable[[], TrainingTask] | None = None,
) -> tuple[dict, TrainingTask]:
    """Train ``task`` as ``stage`` says, writing checkpoints and metrics into ``stage_dir``.

    Resumes from the newest complete ``step-N/`` checkpoint in ``stage_dir`` if there is one. Metrics go
    where ``train.report_to`` says and to the custom ``trackers``. Returns the stage summary
    ``{"steps", "time_s", "metrics"}`` and the trained task to save: ``task`` itself, or under FSDP an
    unsharded copy that ``rebuild`` builds and the gathered weights fill (:mod:`mmfactory.train.sharded`).
    """
    cfg = stage.train
    is_main = accelerator.is_main_process
    fsdp = sharded.is_sharded(accelerator)
    if fsdp and (cfg.ema_decay is not None or rebuild is None):
        what = "train.ema_decay" if rebuild is not None else "a task without a rebuild"
        raise ConfigError(f"stages.{stage.name}: FSDP does not support {what} yet; launch with DDP")
    if cfg.gradient_checkpointing:  # first: a refusal comes before any data is read; before accelerate wraps
        checkpointed = enable_gradient_checkpointing(task, stage)
        accelerator.print(f"[{stage.name}] gradient checkpointing: {', '.join(checkpointed)}")
    dataset = task.train_dataset()
    world, rank = accelerator.num_processes, accelerator.process_index
    if isinstance(dataset, TrainStream):  # a streaming source: batched per process (mmfactory.data.streaming)
        if cfg.group_by_length:
            raise ConfigError(
                f"stages.{stage.name}.train.group_by_length: a streamed source is not known ahead, so its "
                "global batches cannot be sorted by length; read it up front (streaming: false)"
            )
        sampler = None
        steps_per_epoch = (
            dataset.steps_per_epoch(cfg.batch_size * cfg.grad_accum * world) if cfg.max_steps is None else 0
        )
    else:
        lengths = task.train_lengths() if cfg.group_by_length else None
        if cfg.group_by_length and lengths is None:
            raise ConfigError(
                f"stages.{stage.name}.train.group_by_length: {stage.task} samples have no length"
            )
        sampler = StepSampler(
            len(dataset), cfg.batch_size, cfg.grad_accum, world, rank, cfg.seed, cfg.shuffle, lengths
        )
        steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.epochs * steps_per_epoch)
    select_trainable(task, stage.trainable, stage.frozen)
    ema = None
    if cfg.ema_decay is not None:  # its shadow weights are buffers of the task: checkpointed, resumed
        ema = WeightEMA({n: p for n, p in task.named_parameters() if p.requires_grad}, cfg.ema_decay)
        task.weight_ema = ema
    optimizer = build_optimizer(task, stage.optimizer)
    scheduler = build_scheduler(optimizer, total_steps, stage.schedule)
    model, optimizer = accelerator.prepare(task, optimizer)
    trainable = [p for p in task.parameters() if p.requires_grad]  # FSDP swapped them for sharded ones
    if fsdp:
        accelerator.print(f"[{stage.name}] FSDP2: the {accelerator.num_processes} processes hold shards")

    if is_main:
        ckpt.remove_partial(stage_dir)
    accelerator.wait_for_everyone()
    start_step, first_loss = 0, None
    for step, path in reversed(ckpt.list_checkpoints(stage_dir)):  # the newest intact checkpoint
        problem = ckpt.damage(path)
        if problem is not None:
            accelerator.print(f"[{stage.name}] warning: checkpoint {path} is damaged ({problem}); skipped")
            continue
        state = ckpt.load_checkpoint(path, task, optimizer, scheduler, accelerator.process_index, fsdp)
        start_step, first_loss = step, state.get("first_loss")
        accelerator.print(f"[{stage.name}] resumed from {path} (step {step}/{total_steps})")
        break

    log = MetricsLog(stage, stage_dir, enabled=is_main, extra=trackers)
    log.open(start_step)
    if sampler is None:
        stream = dataset.batches(cfg.batch_size, cfg.grad_accum, rank, world, start_step)
        loader = DataLoader(stream, batch_size=None, collate_fn=task.collate)
    else:
        loader = DataLoader(
            dataset,
            batch_sampler=_StepBatches(sampler, start_step),
            collate_fn=task.collate,
            num_workers=cfg.num_workers,
            generator=torch.Generator(),  # keep the global RNG untouched so resumed runs stay bit-identical
        )
    batches = iter(loader)
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=stage.name,
        disable=not is_main,
        dynamic_ncols=True,
        mininterval=1,
    )
    unit = task.loss_unit
    model.train()
    window_items, window_inputs, window_start = 0.0, 0, time.perf_counter()
    stage_start = time.perf_counter()
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        weights = [float(task.loss_weight(b)) for b in micro]
        window_inputs += sum(_input_tokens(b) for b in micro)
        total_weight = accelerator.reduce(torch.tensor(sum(weights), device=accelerator.device), "sum").item()
        if total_weight <= 0:
            raise NonFiniteLossError(f"[{stage.name}] step {step + 1}: the global batch has no loss items")
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            sync = nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
            with sync:
                out = model(_to_device(batch, accelerator.device))
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"[{stage.name}] loss is {loss.item()} at step {step + 1} (micro-batch {i + 1}); "
                        "lower the learning rate or check the data"
                    )
                # DDP averages gradients over processes, hence the factor `world`.
                accelerator.backward(loss * (weights[i] * world / total_weight))
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double() * weights[i]
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm) and stage.train.precision != "fp16":
                raise NonFiniteLossError(
                    f"[{stage.name}] gradient norm is {grad_norm.item()} at step {step + 1}"
                )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()

        done = step + 1
        window_items += total_weight
        should_log = done == 1 or done % cfg.log_every == 0 or done == total_steps
        if should_log:
            last = {k: (accelerator.reduce(v, "sum") / total_weight).item() for k, v in sums.items()}
            elapsed = time.perf_counter() - window_start
            last["lr"] = scheduler.get_last_lr()[0]
            # throughput named by what it counts: the loss's items (labelled tokens, samples, pairs) and,
            # for token batches, every non-padding input token
            last[f"loss_{unit}_per_s"] = window_items / max(elapsed, 1e-9)
            inputs = accelerator.reduce(torch.tensor(window_inputs, device=accelerator.device), "sum").item()
            if inputs:
                last["input_tokens_per_s"] = inputs / max(elapsed, 1e-9)
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            log.log(done, last)
            if first_loss is None:
                first_loss = last["loss"]
            bar.set_postfix(
                loss=f"{last['loss']:.4f}",
                lr=f"{last['lr']:.2e}",
                **{f"{unit}/s": f"{last[f'loss_{unit}_per_s']:.0f}"},
            )
            window_items, window_inputs, window_start = 0.0, 0, time.perf_counter()
        bar.update(1)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
            log.log(done, evaluate_loss(task, accelerator, cfg.eval_batch_size or cfg.batch_size))
        if done == total_steps or (cfg.save_every and done % cfg.save_every == 0):
            _check_finite(trainable, stage.name, done, accelerator)  # nothing non-finite is ever saved
        if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
            rng = _gather_rng(accelerator)
            if fsdp:  # the full trainable weights and optimizer state, gathered on the main process
                named, optimizer_state = sharded.full_training_state(task, optimizer.optimizer)
            elif is_main:
                named = {n: p for n, p in task.named_parameters() if p.requires_grad}
                optimizer_state = optimizer.state_dict()
            if is_main:
                ckpt.save_checkpoint(
                    stage_dir,
                    done,
                    named,
                    optimizer_state,
                    scheduler,
                    rng,
                    extra={"first_loss": first_loss},
                    buffers=ckpt.persistent_buffers(task),
                )
                for _, old in ckpt.list_checkpoints(stage_dir)[: -cfg.keep_checkpoints]:
                    shutil.rmtree(old)
            accelerator.wait_for_everyone()
    bar.close()
    train_time = time.perf_counter() - stage_start

    metrics = {f"train_{k}": v for k, v in last.items() if k != "lr"}
    metrics["trainable_params_m"] = sum(p.numel() for p in trainable) / 1e6
    if fsdp:  # from here on, an unsharded copy on every process: evaluated and saved as one process's
        task = _unsharded(task, rebuild, accelerator)
    if first_loss is not None:
        metrics["train_first_loss"] = first_loss
    final_eval = evaluate_loss(task, accelerator, cfg.eval_batch_size or cfg.batch_size)
    if not all(math.isfinite(v) for v in final_eval.values()):
        raise NonFiniteLossError(
            f"[{stage.name}] evaluation after step {total_steps} is not finite ({final_eval}); nothing was "
            "saved (lower the learning rate)"
        )
    metrics.update(final_eval)
    if is_main:
        task.eval()
        metrics.update(task.evaluate())
        task.train()
    if ema is not None:  # the same evaluation with the averaged weights; the live ones are saved
        with ema.swapped_in():
            ema_metrics = evaluate_loss(task, accelerator, cfg.eval_batch_size or cfg.batch_size)
            if is_main:
                task.eval()
                ema_metrics.update(task.evaluate())
                task.train()
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
    log.log(total_steps, {k: v for k, v in metrics.items() if isinstance(v, int | float)})
    log.close()
    return {"steps": total_steps, "time_s": round(train_time, 2), "metrics": metrics}, task


def _unsharded(
    task: TrainingTask, rebuild: Callable[[], TrainingTask], accelerator: Accelerator
) -> TrainingTask:
    """A new task from ``rebuild`` holding ``task``'s trained weights, gathered in full on every process;
    its prepare step reads back the artifacts the stage prepared."""
    weights = sharded.full_model_state(task)
    copy = rebuild()
    copy.load_state_dict(weights)
    copy.to(accelerator.device)
    copy.prepare(accelerator)
    return copy
