"""Pool scoring and selection: every pair scored exactly once (also after a resume mid-shard and a real
SIGKILL), two processes equal one, bad items counted per reason, and DuckDB's top fraction equal to a
naive sort."""

import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmfactory.filter_align.score import score_pool
from mmfactory.filter_align.select import select_top
from tests.tasks.test_reward_task import make_task


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    task = make_task(folder)
    import torch

    with torch.no_grad():  # a head that is not the plain cosine
        task.model.head.fusion.mlp[-1].weight.normal_()
    task.save_pretrained(folder / "final")
    return folder / "final"


def read_scores(out) -> list[tuple[str, float | None, str]]:
    rows = []
    for part in sorted(out.glob("*/part-*.parquet")):
        table = pq.read_table(part).to_pydict()
        rows += list(zip(table["uid"], table["score"], table["status"], strict=True))
    return rows


def test_a_pool_is_scored_once_per_pair_and_resumes_mid_shard(tmp_path, reward_dir):
    out = tmp_path / "scores"
    summary = score_pool(reward_dir, "world:60:0.5", out, batch_size=8, chunk=10, shard_size=25)
    assert summary["pairs"] == 60 and summary["statuses"] == {"ok": 60} and summary["shards"] == 3
    rows = read_scores(out)
    assert sorted(uid for uid, _, _ in rows) == [f"pool-{i:06d}" for i in range(60)]
    done = json.loads((out / "world-00001" / "DONE.json").read_text())
    assert done == {"shard": "world-00001", "pairs": 25, "statuses": {"ok": 25}}
    # As if killed mid-shard: shard 1 lost its DONE and its last part
    (out / "world-00001" / "DONE.json").unlink()
    sorted((out / "world-00001").glob("part-*.parquet"))[-1].unlink()
    again = score_pool(reward_dir, "world:60:0.5", out, batch_size=8, chunk=10, shard_size=25)
    assert again["pairs"] == 60 and sorted(read_scores(out)) == sorted(rows)


def test_two_processes_score_what_one_does(tmp_path, reward_dir):
    one = tmp_path / "one"
    score_pool(reward_dir, "world:40:0.5", one, batch_size=16, shard_size=10)
    two = tmp_path / "two"
    for rank in range(2):
        part = score_pool(
            reward_dir, "world:40:0.5", two, batch_size=16, shard_size=10, rank=rank, world_size=2
        )
        assert part["shards"] == 2
    a, b = sorted(read_scores(one)), sorted(read_scores(two))
    assert [r[0] for r in a] == [r[0] for r in b]
    np.testing.assert_allclose([r[1] for r in a], [r[1] for r in b], atol=1e-6)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_pool_items_are_rows_with_their_reason(tmp_path, reward_dir):
    members = [
        ("a.png", _png(10)),
        ("a.txt", b"a red square"),
        ("b.png", b"not an image"),
        ("b.txt", b"broken"),
        ("c.png", _png(30)),  # no caption
        ("d.txt", b"no image"),
    ]
    with tarfile.open(tmp_path / "pool-0.tar.gz", "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary = score_pool(reward_dir, str(tmp_path / "pool-{0..0}.tar.gz"), tmp_path / "scores")
    assert summary["statuses"] == {"ok": 1, "corrupt_image": 1, "empty_text": 1, "missing_file": 1}
    rows = {uid: (score, status) for uid, score, status in read_scores(tmp_path / "scores")}
    assert rows["b"] == (None, "corrupt_image") and rows["a"][0] is not None


def test_selection_keeps_the_top_fraction_as_a_naive_sort_does(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    scores = tmp_path / "scores"
    rows = []
    for shard in range(3):
        (scores / f"s{shard}").mkdir(parents=True)
        uids = [f"u{shard}-{i:03d}" for i in range(200)]
        values = rng.integers(0, 50, 200).astype(float).tolist()  # many ties: broken by uid
        status = ["ok" if i % 17 else "corrupt_image" for i in range(200)]
        values = [v if st == "ok" else None for v, st in zip(values, status, strict=True)]
        pq.write_table(
            pa.table({"uid": uids, "score": values, "status": status}),
            scores / f"s{shard}" / "part-00000.parquet",
        )
        rows += [(u, v) for u, v, st in zip(uids, values, status, strict=True) if st == "ok"]
    naive = sorted(rows, key=lambda r: (-r[1], r[0]))
    summary = select_top(scores, tmp_path / "kept", keep=0.3)
    kept = pq.read_table(tmp_path / "kept" / "kept.parquet").to_pydict()
    count = math.ceil(0.3 * len(rows))
    assert list(zip(kept["uid"], kept["score"], strict=True)) == naive[:count]
    assert summary == {
        "scored": len(rows),
        "bad": 600 - len(rows),
        "kept": count,
        "fraction": count / len(rows),
        "threshold": naive[count - 1][1],
    }
    assert (tmp_path / "kept" / "kept_uids.txt").read_text().split() == sorted(kept["uid"])
    by_threshold = select_top(scores, tmp_path / "t", threshold=20.0)
    assert by_threshold["kept"] == sum(v >= 20 for _, v in rows)


def test_a_scoring_job_killed_mid_shard_resumes_with_no_pair_lost_or_twice(tmp_path, reward_dir):
    cmd = [
        sys.executable,
        "-m",
        "mmfactory.cli",
        "filter",
        "score",
        "--model",
        str(reward_dir),
        "--pool",
        "world:400:0.5",
        "--shard-size",
        "200",
        "--chunk",
        "20",
        "--batch-size",
        "10",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while (
        not list((out / "world-00000").glob("part-00003.parquet")) if (out / "world-00000").is_dir() else True
    ):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (out / "world-00000" / "DONE.json").exists(), "killed too late: the first shard finished"
    subprocess.run([*cmd, "--out", str(out)], env=env, check=True, capture_output=True)
    rows = read_scores(out)
    assert sorted(uid for uid, _, _ in rows) == [f"pool-{i:06d}" for i in range(400)]  # none lost, none twice


def test_ray_data_actors_score_what_one_process_does(tmp_path, reward_dir):
    import ray

    one = tmp_path / "one"
    score_pool(reward_dir, "world:40:0.5", one, batch_size=16, shard_size=10)
    from mmfactory.filter_align.score import score_pool_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = score_pool_ray(
            reward_dir, "world:40:0.5", tmp_path / "ray", batch_size=16, shard_size=10, workers=2
        )
    finally:
        ray.shutdown()
    assert summary["pairs"] == 40 and summary["shards"] == 4
    a, b = sorted(read_scores(one)), sorted(read_scores(tmp_path / "ray"))
    assert [r[0] for r in a] == [r[0] for r in b]
    np.testing.assert_allclose([r[1] for r in a], [r[1] for r in b], atol=1e-6)


def test_jsonl_and_parquet_pools_score_alike_and_count_their_bad_rows(tmp_path, reward_dir):
    import pyarrow as pa

    (tmp_path / "img").mkdir()
    pngs = {name: _png(v) for name, v in (("a", 10), ("b", 90), ("c", 200))}
    for name, data in pngs.items():
        (tmp_path / "img" / f"{name}.png").write_bytes(data)
    texts = {"a": "a red square", "b": "a blue circle", "c": "a green star"}
    rows = [{"uid": n, "image": f"img/{n}.png", "text": texts[n]} for n in pngs]
    lines = [json.dumps(r) for r in rows] + [
        json.dumps({"id": "gone", "image": "img/none.png", "text": "x"}),
        json.dumps({"uid": "silent", "image": "img/a.png", "caption": " "}),
        "{not json",
    ]
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    table = {
        "uid": list(pngs),
        "image": [{"bytes": pngs[n], "path": None} for n in pngs],  # a Hugging Face Image column
        "text": [texts[n] for n in pngs],
    }
    pq.write_table(pa.table(table), tmp_path / "pool.parquet")
    jsonl = score_pool(reward_dir, str(tmp_path / "pool.jsonl"), tmp_path / "s-jsonl")
    parquet = score_pool(reward_dir, str(tmp_path / "pool.parquet"), tmp_path / "s-parquet")
    assert jsonl["statuses"] == {"ok": 3, "missing_file": 1, "empty_text": 1, "malformed_json": 1}
    assert parquet["statuses"] == {"ok": 3}
    from_paths = {u: s for u, s, st in read_scores(tmp_path / "s-jsonl") if st == "ok"}
    from_bytes = {u: s for u, s, _ in read_scores(tmp_path / "s-parquet")}
    assert from_paths.keys() == from_bytes.keys() == set(pngs)
    np.testing.assert_allclose([from_paths[u] for u in pngs], [from_bytes[u] for u in pngs], atol=1e-6)
    assert {u for u, _, _ in read_scores(tmp_path / "s-jsonl")} >= {"gone", "silent", "pool-5"}
