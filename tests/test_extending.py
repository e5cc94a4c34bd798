"""docs/extending.md runs as written: its files (blocks opening with ``# file:``) are written into a temporary
package, plugged in as the page shows, and exercised: the format reads a CSV and counts its bad row, the task
trains through the real CLI with its prepare step, and the artifact is reused, then refused when stale."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmfactory.artifacts import ArtifactMismatch
from mmfactory.cli import main
from mmfactory.config import load_recipe
from mmfactory.data.policy import BadSampleError
from mmfactory.data.source_config import FORMATS, Format, SourceConfig
from mmfactory.data.sources import read_sources
from mmfactory.tasks import TASKS, build_task
from mmfactory.tasks.base import StageContext

DOC = Path(__file__).parents[1] / "docs" / "extending.md"
BLOCK = re.compile(r"```(?:python|yaml)\n# file: (\S+)\n(.*?)```", re.S)


@pytest.fixture
def example(tmp_path, monkeypatch) -> Path:
    """The page's files under ``tmp_path``, importable, with the format and the task plugged in as shown."""
    for name, body in BLOCK.findall(DOC.read_text()):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    (tmp_path / "extending_example" / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        FORMATS, "qa_csv", Format(("chat",), frozenset({"path"}), "extending_example.formats:read_qa_csv")
    )
    monkeypatch.setitem(TASKS, "linear_pixels", "extending_example.task:LinearPixelClassifierTask")
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("extending_example")]:
        del sys.modules[module]


def test_the_page_holds_the_three_files_it_describes():
    assert [name for name, _ in BLOCK.findall(DOC.read_text())] == [
        "extending_example/formats.py",
        "extending_example/task.py",
        "extending_example/recipe.yaml",
    ]


def test_the_example_format_reads_chats_and_counts_a_bad_row(example):
    csv = example / "faq.csv"
    csv.write_text("question,answer\nWhat colour is the sky?,blue\nAnd the grass?,\nHow many suns?,one\n")
    counts = Counter()
    chats = read_sources(
        [SourceConfig("qa_csv", path=str(csv), on_bad_sample="skip")], "chat", counts, "train"
    )
    assert chats.messages[1] == [
        {"role": "user", "content": "How many suns?"},
        {"role": "assistant", "content": "one"},
    ]
    assert len(chats) == 2 and counts["train/bad_empty_text"] == 1 and counts["train/qa_csv_rows"] == 2
    with pytest.raises(BadSampleError, match=r"faq.csv, line 3: no answer"):
        read_sources([SourceConfig("qa_csv", path=str(csv))], "chat", Counter(), "train")


def test_the_example_task_prepares_once_trains_and_refuses_stale_statistics(example, capsys):
    recipe = example / "extending_example" / "recipe.yaml"
    out = example / "run"
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    stats = out / "classify" / "pixel_stats" / "stats.json"
    made = stats.stat().st_mtime_ns
    records = [json.loads(line) for line in (out / "classify" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["train_loss"] < final["train_first_loss"] - 0.1  # it learns
    assert final["eval_loss"] < math.log(8) and final["eval_accuracy"] > 1 / 8  # eight shapes: above chance
    assert (out / "classify" / "final" / "head.safetensors").is_file()

    stage = load_recipe(recipe).stages[0]
    ctx = StageContext(out, out / "classify")
    task = build_task(stage, 0, ctx)
    accelerator = type("One", (), {"is_main_process": True, "wait_for_everyone": lambda self: None})()
    task.prepare(accelerator)  # reused as it is
    assert stats.stat().st_mtime_ns == made
    stage.data["train"][0]["size"] = 256
    with pytest.raises(ArtifactMismatch, match="pixel_stats"):
        build_task(stage, 0, ctx).prepare(accelerator)
