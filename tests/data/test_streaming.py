"""Streaming webdataset sources: brace-expanded .tar.gz shards split across processes with no sample read
twice or lost, a shuffle buffer, pad-by-wrapping (every process takes the same steps), 1x8 == 8x1,
exact resume from a step (also after SIGKILL, through the CLI), and bad samples skipped and counted."""

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmfactory.config import ConfigError, from_dict
from mmfactory.data.policy import BadSampleError
from mmfactory.data.source_config import SourceConfig
from mmfactory.data.sources import read_sources
from mmfactory.data.streaming import StreamBatches
from tests.helpers import run_and_kill, write_recipe
from tests.test_image_text_contrastive import TINY_CLIP

SHARD_SIZES = (3, 5, 2, 4)  # uneven on purpose


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 0)).save(out, format="PNG")
    return out.getvalue()


def write_shards(root, sizes=SHARD_SIZES, corrupt: str | None = None) -> str:
    """``root/shard-{0..n-1}.tar.gz``; sample ``s{shard}-{i}`` has a PNG and a caption. Returns the
    brace pattern."""
    for shard, size in enumerate(sizes):
        with tarfile.open(root / f"shard-{shard}.tar.gz", "w:gz") as tar:
            for i in range(size):
                key = f"s{shard}-{i}"
                image = b"not a png" if key == corrupt else _png(10 * shard + i)
                for name, data in ((f"{key}.png", image), (f"{key}.txt", f"caption of {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"shard-{{0..{len(sizes) - 1}}}.tar.gz")


def stream(pattern: str, counts=None, **source):
    cfg = from_dict(SourceConfig, {"format": "webdataset", "path": pattern, "streaming": True, **source}, "s")
    return read_sources([cfg], "image-text", Counter() if counts is None else counts, "train")


def keys(batches, steps: int) -> list[list[str]]:
    return [[item["key"] for item in batch] for batch in islice(iter(batches), steps)]


def _key_item(sample, rng):
    return {"key": sample["key"], "image": sample["image"], "draw": float(rng.random())}


def test_one_pass_splits_the_shards_across_processes_with_no_sample_twice_or_lost(tmp_path):
    data = stream(write_shards(tmp_path), shuffle_buffer=4)
    assert data.shards == [str(tmp_path / f"shard-{i}.tar.gz") for i in range(4)]  # brace expansion
    passes = [[raw["__key__"] for raw in data.raw_pass(0, rank, 2)] for rank in range(2)]
    every = [f"s{s}-{i}" for s, n in enumerate(SHARD_SIZES) for i in range(n)]
    assert sorted(passes[0] + passes[1]) == sorted(every) and not set(passes[0]) & set(passes[1])
    assert passes[0] != sorted(passes[0]) or passes[1] != sorted(passes[1])  # the buffer shuffled
    assert [raw["__key__"] for raw in data.raw_pass(0, 0, 2)] == passes[0]  # seeded: replays
    assert [raw["__key__"] for raw in data.raw_pass(1, 0, 2)] != passes[0]  # each pass reshuffles


def test_uneven_shards_wrap_so_every_process_takes_the_same_steps(tmp_path):
    data = stream(write_shards(tmp_path), shuffle_buffer=0)
    steps = [keys(StreamBatches(data, _key_item, 3, 1, rank, 2, 0), 9) for rank in range(2)]
    assert [len(s) for s in steps] == [9, 9] and all(len(b) == 3 for s in steps for b in s)
    for rank in range(2):  # 27 samples of a process: its passes one after the other (each ~7 samples)
        passes = [raw["__key__"] for epoch in range(6) for raw in data.raw_pass(epoch, rank, 2)]
        assert [k for batch in steps[rank] for k in batch] == passes[:27]
    with pytest.raises(ConfigError, match="4 shards for 5 processes"):
        next(iter(StreamBatches(data, _key_item, 1, 1, 0, 5, 0)))


def test_steps_do_not_depend_on_the_accumulation_split_and_resume_at_the_exact_sample(tmp_path):
    data = stream(write_shards(tmp_path), shuffle_buffer=3)
    whole = keys(StreamBatches(data, _key_item, 4, 1, 0, 1, 0), 6)
    split = keys(StreamBatches(data, _key_item, 1, 4, 0, 1, 0), 24)
    assert [k for b in split for k in b] == [k for b in whole for k in b]  # 1x4 == 4x1
    resumed = StreamBatches(data, _key_item, 4, 1, 0, 1, 4)
    assert keys(resumed, 2) == whole[4:]
    draws = [[i["draw"] for i in b] for b in islice(iter(StreamBatches(data, _key_item, 4, 1, 0, 1, 0)), 6)]
    assert [[i["draw"] for i in b] for b in islice(iter(resumed), 2)] == draws[4:]  # same per-sample RNG


def test_bad_samples_are_skipped_and_counted_or_stop_the_run_naming_shard_and_key(tmp_path, capsys):
    pattern = write_shards(tmp_path, corrupt="s1-2")
    counts = Counter()
    data = stream(pattern, counts, shuffle_buffer=0, on_bad_sample="skip")
    seen = [k for b in keys(StreamBatches(data, _key_item, 13, 1, 0, 1, 0), 1) for k in b]
    assert "s1-2" not in seen and len(set(seen)) == 13 and counts["train/bad_corrupt_image"] == 1
    assert "shard-1.tar.gz, sample 's1-2'" in capsys.readouterr().err
    with pytest.raises(BadSampleError, match=r"shard-1.tar.gz, sample 's1-2'"):
        keys(StreamBatches(stream(pattern, shuffle_buffer=0), _key_item, 14, 1, 0, 1, 0), 1)


def test_stream_settings_that_cannot_apply_are_refused(tmp_path):
    pattern = write_shards(tmp_path)
    with pytest.raises(ConfigError, match="limit and weight do not apply"):
        stream(pattern, limit=3)
    with pytest.raises(ConfigError, match="evaluation reads its samples up front"):
        source = from_dict(SourceConfig, {"format": "webdataset", "path": pattern, "streaming": True}, "s")
        read_sources([source], "image-text", Counter(), "eval")
    with pytest.raises(ConfigError, match="stream compressed ones"):
        read_sources(
            [from_dict(SourceConfig, {"format": "webdataset", "path": pattern}, "s")],
            "image-text",
            Counter(),
            "train",
        )


def _cli(recipe, out) -> list[str]:
    return [sys.executable, "-m", "mmfactory.cli", "run", str(recipe), "--output", str(out)]


def test_sigkill_then_resume_on_a_stream_is_bit_identical(tmp_path):
    pattern = write_shards(tmp_path, sizes=(6, 5, 7))
    recipe = {
        "name": "test/stream",
        "stages": [
            {
                "name": "clip",
                "task": "image_text_contrastive",
                "model": {"tiny": TINY_CLIP},
                "data": {
                    "train": [
                        {"format": "webdataset", "path": pattern, "streaming": True, "shuffle_buffer": 4}
                    ],
                    "eval": [],
                },
                "train": {"batch_size": 4, "max_steps": 40, "save_every": 4, "log_every": 2, "seed": 0},
            }
        ],
    }
    path = write_recipe(recipe, tmp_path / "r.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cli(path, reference), check=True, env=env, capture_output=True)

    resumed = tmp_path / "resumed"
    run_and_kill(_cli(path, resumed), resumed / "clip" / "step-8", env)
    done = subprocess.run(_cli(path, resumed), check=True, env=env, capture_output=True, text=True)
    assert "resumed from" in done.stdout + done.stderr

    a, b = (load_file(run / "clip/final/model.safetensors") for run in (reference, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        records = [json.loads(line) for line in (run / "clip/metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss")) for r in records]

    assert losses(resumed) == losses(reference) and np.isfinite([l for _, l in losses(reference) if l]).all()


def _parquet_chats(root, files=3, rows=5, bad_row=None) -> str:
    """``root/chats-{i}.parquet`` with messages rows ``c{file}-{row}``; returns the glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in range(files):
        messages = []
        for r in range(rows):
            reply = "" if (f, r) == bad_row else f"reply {f}-{r}"
            messages.append(
                [{"role": "user", "content": f"c{f}-{r}"}, {"role": "assistant", "content": reply}]
            )
        pq.write_table(pa.table({"messages": messages}), root / f"chats-{f}.parquet")
    return str(root / "chats-*.parquet")


def _prompt(sample, rng):
    return {"key": sample["messages"][0]["content"]}


def test_hf_streams_split_parquet_files_across_processes_and_resume_exactly(tmp_path):
    cfg = {"format": "hf", "path": _parquet_chats(tmp_path), "streaming": True, "shuffle_buffer": 4}
    source = from_dict(SourceConfig, cfg, "s")
    data = read_sources([source], "chat", Counter(), "train")
    assert len(data.shards) == 3  # one shard per file
    passes = [
        [data.decode(raw)["messages"][0]["content"] for raw in data.raw_pass(0, r, 2)] for r in range(2)
    ]
    every = [f"c{f}-{r}" for f in range(3) for r in range(5)]
    assert sorted(passes[0] + passes[1]) == every and not set(passes[0]) & set(passes[1])
    whole = keys(StreamBatches(data, _prompt, 4, 1, 0, 1, 0), 6)
    assert keys(StreamBatches(data, _prompt, 4, 1, 0, 1, 3), 3) == whole[3:]


def test_a_chat_stage_trains_from_a_streamed_parquet_source_through_the_cli(tmp_path, capsys):
    from mmfactory.cli import main
    from tests.helpers import tiny_sft_recipe

    pattern = _parquet_chats(tmp_path, files=2, rows=20, bad_row=(1, 3))
    recipe = tiny_sft_recipe(max_steps=6)
    recipe["stages"][0]["data"] = {
        "train": [{"format": "hf", "path": pattern, "streaming": True, "on_bad_sample": "skip"}],
        "eval": [],
        "max_length": 32,
    }
    recipe["stages"][0]["options"] = {"eval": {"generate": 0}}
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 0
    done = json.loads((out / "sft" / "DONE").read_text())
    assert done["steps"] == 6 and done["data"]["train/bad_empty_text"] >= 1  # the empty reply, skipped
    losses = [json.loads(line)["loss"] for line in (out / "sft/metrics.jsonl").read_text().splitlines()[:-1]]
    assert losses[-1] < losses[0]
    assert (
        main(["run", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "g"), "train.group_by_length=true"])
        == 2
    )
    assert "group_by_length: a streamed source is not known ahead" in capsys.readouterr().err
