"""A finished stage is never reused once what it was built from changed: a retrained upstream stage or an
edited data file makes it run again (or, with --no-rerun-stale, stops the run in one line), while an
upstream retrained to the same weights keeps it."""

import json
import shutil

from safetensors.torch import load_file

from mmfactory.cli import main
from tests.helpers import tiny_sft_recipe, write_recipe


def _two_stages(tmp_path, data=None):
    recipe = tiny_sft_recipe(max_steps=2)
    first = recipe["stages"][0]
    if data is not None:
        first["data"] = data
    recipe["stages"] = [{**first, "name": "a"}, {**first, "name": "b", "model": {}, "init_from": "a"}]
    return write_recipe(recipe, tmp_path / "r.yaml")


def _run(path, out, *extra) -> int:
    return main(["run", str(path), "--output", str(out), *extra])


def test_a_retrained_upstream_makes_the_downstream_stage_run_again(tmp_path, capsys):
    path, out = _two_stages(tmp_path), tmp_path / "run"
    assert _run(path, out) == 0
    before = load_file(out / "b/final/model.safetensors")
    fingerprint = json.loads((out / "b" / "DONE").read_text())["fingerprint"]

    (out / "a" / "DONE").unlink()  # retrain a exactly as before: same weights, b is kept
    capsys.readouterr()
    assert _run(path, out) == 0
    assert "[b] already done: skipped" in capsys.readouterr().out

    shutil.rmtree(out / "a")  # retrain a differently: b was built on the old a
    assert _run(path, out, "stages.a.train.seed=1") == 0
    printed = capsys.readouterr().out
    assert "[b] upstream stage 'a' changed since it ran: running it again" in printed
    after = load_file(out / "b/final/model.safetensors")
    assert any(not (before[k] == after[k]).all() for k in before)
    assert json.loads((out / "b" / "DONE").read_text())["fingerprint"] != fingerprint


def test_no_rerun_stale_stops_in_one_line(tmp_path, capsys):
    path, out = _two_stages(tmp_path), tmp_path / "run"
    assert _run(path, out) == 0
    shutil.rmtree(out / "a")
    capsys.readouterr()
    assert _run(path, out, "--no-rerun-stale", "stages.a.train.seed=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "mmfactory: configuration error: stages[1] b: done, but upstream stage 'a' changed since it ran "
        "(rerun without --no-rerun-stale)"
    )


def test_an_edited_data_file_makes_its_stage_run_again(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(40)
    ]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": [{"format": "messages", "path": str(chats)}], "eval": [], "max_length": 32}
    path, out = _two_stages(tmp_path, data), tmp_path / "run"
    assert _run(path, out) == 0
    chats.write_text(chats.read_text() + json.dumps(rows[0]) + "\n")
    capsys.readouterr()
    assert _run(path, out) == 0
    printed = capsys.readouterr().out
    assert f"[a] data file {chats} changed since it ran: running it again" in printed
    assert "[b] upstream stage 'a' changed since it ran" in printed  # a's new weights: b reruns too
