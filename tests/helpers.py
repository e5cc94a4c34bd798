"""Shared test helpers: tiny recipes run through the real CLI."""

from __future__ import annotations

from pathlib import Path

import yaml

# A 2-layer, 32-wide Qwen2 on a few dozen world chats: seconds per run on a CPU.
TINY_LM = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}


# End-of-stage MLLM benchmarks small enough for CLI tests (world images of 16 pixels).
TINY_BENCHMARKS = {
    "vqa": 4,
    "pope": 2,
    "captions": 2,
    "max_new_tokens": 4,
    "caption_max_new_tokens": 6,
    "world": {"image_size": 16},
}
TINY_EVAL = {"eval": TINY_BENCHMARKS}  # as a stage's options
NO_BENCHMARKS = {"eval": {"vqa": 0, "pope": 0, "captions": 0}}


def world_data(
    kinds: list[str],
    train: int,
    eval: int,
    image_size: int | None = None,
    languages: list | None = None,
    **rest,
) -> dict:
    """A stage's ``data`` reading world ``kinds``: ``train`` samples of each, ``eval`` from the val split."""
    extra = {} if image_size is None else {"image_size": image_size}
    extra.update({} if languages is None else {"languages": languages})

    def sources(split: str, size: int) -> list[dict]:
        return (
            [{"format": "world", "kind": k, "split": split, "size": size, **extra} for k in kinds]
            if size
            else []
        )

    return {"train": sources("train", train), "eval": sources("val", eval), **rest}


def sag_world(train: int, eval: int, benchmark: int, self_improve: int = 0, **rest) -> dict:
    """A SAG stage's ``data``: world articles in English and Chinese, ``self_improve`` of them 100k into
    the training split (none: the train sources)."""

    def articles(split: str, size: int, offset: int = 0) -> list[dict]:
        source = {
            "format": "world",
            "kind": "articles",
            "split": split,
            "size": size,
            "languages": ["en", "zh"],
        }
        return [{**source, "offset": offset}] if offset else [source]

    return {
        "train": articles("train", train),
        "eval": articles("val", eval) if eval else [],
        "benchmark": articles("test", benchmark) if benchmark else [],
        "self_improve": articles("train", self_improve, 100_000) if self_improve else None,
        **rest,
    }


def tiny_sft_recipe(**train) -> dict:
    """A one-stage SFT recipe (plain data) small enough for unit tests."""
    return {
        "name": "test/sft",
        "defaults": {
            "optimizer": {"lr": 3.0e-3},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"batch_size": 8, "max_steps": 12, "log_every": 1, "seed": 0, **train},
        },
        "stages": [
            {
                "name": "sft",
                "task": "causal_lm_sft",
                "model": {"tiny": dict(TINY_LM)},
                "data": world_data(["chat"], 96, 8, max_length=64),
                "options": {"eval": {"generate": 2, "max_new_tokens": 4}},
            }
        ],
    }


def write_recipe(recipe: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_and_kill(cmd: list[str], when: Path, env: dict, timeout: float = 120) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``when`` exists (a checkpoint folder), and check it was
    killed mid-run."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not when.is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (when.parent / "DONE").exists(), "the kill came too late to test resuming"
