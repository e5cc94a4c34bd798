"""Filter & Align as recipe stages: a pool_filter stage selects what a naive sort of its scores selects and
measures itself against the world's hidden truth as a naive count does; a later stage trains on exactly
the kept pairs (keep_uids); an image-text matching stage (BLIP-score) learns with frozen towers; references
to nothing are refused before anything trains."""

import hashlib
import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.config import ConfigError
from mmfactory.data.source_config import SourceConfig
from mmfactory.data.world_source import world_pool_samples, world_web_pool
from tests.helpers import world_data, write_recipe
from tests.test_image_text_contrastive import TINY_CLIP, clip_stage

POOL, KEEP = "world:120:0.5", 0.3


def _filter(name: str, scorer: str, init_from: str | None = None) -> dict:
    stage = {"name": name, "task": "pool_filter", "data": {"pool": POOL, "shard_size": 50}}
    stage["options"] = {"scorer": scorer, "keep": KEEP, "report_keeps": [0.5], "batch_size": 16}
    return stage if init_from is None else {**stage, "init_from": init_from}


RECIPE = {
    "name": "test/filter",
    "defaults": {"train": {"batch_size": 16, "log_every": 5, "seed": 0}},
    "stages": [
        clip_stage(32, 5),
        {
            "name": "itm",
            "task": "image_text_matching",
            "init_from": "clip",
            "model": {"fusion": "cross", "head_hidden": 16, "head_layers": 1, "head_heads": 2},
            "data": world_data(["scenes"], 64, 16),
            "trainable": ["model.head.*"],
            "optimizer": {"lr": 1.0e-2},
            "train": {"max_steps": 60},
        },
        _filter("filter_itm", "reward", "itm"),
        _filter("filter_random", "random"),
        {
            "name": "train_random",
            "task": "image_text_contrastive",
            "model": {"tiny": TINY_CLIP},
            "data": {
                "train": [{"format": "world", "kind": "web_pool", "size": 120, "keep_uids": "filter_random"}],
                "eval": [{"format": "world", "kind": "scenes", "split": "test", "size": 8}],
            },
            "train": {"max_steps": 2},
        },
        {
            "name": "train_random_50",
            "task": "image_text_contrastive",
            "model": {"tiny": TINY_CLIP},
            "data": {
                "train": [
                    {
                        "format": "world",
                        "kind": "web_pool",
                        "size": 120,
                        "keep_uids": "filter_random/keep-0.5",
                    }
                ],
                "eval": [],
            },
            "train": {"max_steps": 2},
        },
    ],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("filter") / "run"
    recipe = write_recipe(RECIPE, out.parent / "recipe.yaml")
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    return out


def _random_score(uid: str, seed: int = 0) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{uid}".encode()).digest()[:8], "big") / 2.0**64


def test_the_random_filter_keeps_what_a_naive_sort_keeps_and_measures_itself_naively(run):
    pool = world_web_pool(120, 0.5)
    ranked = sorted(pool, key=lambda p: (-_random_score(p["uid"]), p["uid"]))
    kept = ranked[: math.ceil(KEEP * len(pool))]
    assert (run / "filter_random/final/kept_uids.txt").read_text().split() == sorted(p["uid"] for p in kept)
    done = json.loads((run / "filter_random/DONE").read_text())
    metrics = done["metrics"]
    assert done["steps"] == 0 and metrics["kept"] == len(kept) and metrics["pool_ok"] == 120
    kept_uids = {p["uid"] for p in kept}
    dropped_bad = sum(not p["aligned"] and p["uid"] not in kept_uids for p in pool)
    assert metrics["keep30_drop_precision"] == pytest.approx(100 * dropped_bad / (120 - len(kept)))
    assert metrics["keep30_drop_recall"] == pytest.approx(
        100 * dropped_bad / sum(not p["aligned"] for p in pool)
    )
    briefs = [p for p in pool if p["kind"] == "brief"]
    share = 100 * sum(p["uid"] in kept_uids for p in briefs) / len(briefs)
    assert metrics["keep30_kept_brief"] == pytest.approx(share)
    assert "keep50_drop_precision" in metrics


def test_a_later_stage_trains_on_exactly_the_kept_pairs(run):
    kept = set((run / "filter_random/final/kept_uids.txt").read_text().split())
    data = json.loads((run / "train_random/DONE").read_text())["data"]
    truth = {p["uid"]: p["aligned"] for p in world_web_pool(120, 0.5)}
    assert data["train/web_pool_kept"] == len(kept) == data["train/images"]
    assert data["train/web_pool_misaligned"] == sum(not truth[uid] for uid in kept)


def test_a_later_stage_trains_on_the_selection_at_a_reported_fraction(run):
    kept = (run / "filter_random/final/keep-0.5/kept_uids.txt").read_text().split()
    ranked = sorted(world_web_pool(120, 0.5), key=lambda p: (-_random_score(p["uid"]), p["uid"]))
    assert kept == sorted(p["uid"] for p in ranked[:60])
    data = json.loads((run / "train_random_50/DONE").read_text())["data"]
    assert data["train/web_pool_kept"] == 60 == data["train/images"]
    upstream = json.loads((run / "train_random_50/DONE").read_text())["lineage"]["upstream"]
    assert list(upstream) == ["filter_random"]


def test_the_matching_stage_learns_with_frozen_towers_and_filters_by_its_logit(run):
    records = [json.loads(line) for line in (run / "itm/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    clip, itm = (
        load_file(run / "clip/final/model.safetensors"),
        load_file(run / "itm/final/model.safetensors"),
    )
    assert clip.keys() == itm.keys() and all(torch.equal(clip[k], itm[k]) for k in clip)
    assert load_file(run / "itm/final/reward_head.safetensors")["fusion.out.weight"].abs().sum() > 0
    metrics = json.loads((run / "filter_itm/DONE").read_text())["metrics"]
    assert metrics["kept"] == math.ceil(KEEP * 120)


def test_keep_uids_naming_nothing_is_refused_before_anything_trains(tmp_path, capsys):
    recipe = {**RECIPE, "stages": [RECIPE["stages"][0], RECIPE["stages"][-2]]}
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stages[1].data.train[0].keep_uids: 'filter_random' is neither an earlier stage" in err
    assert not (out / "clip").exists()
    recipe["stages"][1] = RECIPE["stages"][-1]
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 2
    assert "keep_uids: 'filter_random/keep-0.5' is neither an earlier stage" in capsys.readouterr().err


def test_pool_sources_refuse_uids_from_another_pool_and_keys_of_other_kinds(tmp_path):
    uids = tmp_path / "uids.txt"
    uids.write_text("pool-000001\npool-999999\n")
    with pytest.raises(ConfigError, match="1 uids that are not in the world's pool of 10"):
        world_pool_samples(10, 0.5, 32, str(uids), "image-text", Counter())
    with pytest.raises(ConfigError, match="bad_fraction: only the world's web_pool reads it"):
        SourceConfig("world", kind="scenes", bad_fraction=0.2).validate()
    chats = world_pool_samples(10, 0.5, 32, None, "image-chat", Counter())
    assert len(chats) == 10 and chats.messages[0][1]["content"] == world_web_pool(10, 0.5)[0]["text"]


def test_captioners_of_a_mixed_pool_are_scored_against_brief_and_detailed_references():
    from mmfactory.data.world_source import world_benchmarks

    brief = world_benchmarks(0, 0, 3).captions
    both = world_benchmarks(0, 0, 3, caption_details=["brief", "detailed"]).captions
    assert [c["references"][:1] for c in both] == [c["references"] for c in brief]
    assert all(len(c["references"]) == 2 and c["references"][1] != c["references"][0] for c in both)
    assert [c["objects"] for c in both] == [c["objects"] for c in brief]
