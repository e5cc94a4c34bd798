"""Damaged run state never blocks a rerun and nothing non-finite is saved, through the real CLI: a damaged
newest checkpoint is skipped with a warning naming it (the run resumes from the previous one), a torn
last line of metrics.jsonl is dropped, an unreadable DONE makes the stage run again, and a run whose
weights or evaluation go non-finite on its last step fails in one line without writing DONE."""

import json

import pytest

from mmfactory.cli import main
from tests.helpers import tiny_sft_recipe, write_recipe


def _run(path, out, *overrides) -> int:
    return main(["run", str(path), "--output", str(out), *overrides])


@pytest.mark.parametrize("damage", ["truncate_weights", "drop_optimizer_json", "truncate_state"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys, damage, monkeypatch):
    path = write_recipe(tiny_sft_recipe(max_steps=6, save_every=2, keep_checkpoints=3), tmp_path / "r.yaml")
    out = tmp_path / "run"
    # Stop the run right after its step-4 checkpoint, as a crash would.
    from mmfactory.train import checkpoint as ckpt

    save = ckpt.save_checkpoint

    def save_then_crash(directory, step, *args, **kwargs):
        result = save(directory, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    assert _run(path, out) == 130
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    step4 = out / "sft" / "step-4"
    if damage == "truncate_weights":
        weights = step4 / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "drop_optimizer_json":
        (step4 / "optimizer.json").unlink()
    else:
        state = step4 / "state.json"
        state.write_text(state.read_text()[:20])
    capsys.readouterr()
    assert _run(path, out) == 0
    printed = capsys.readouterr()
    assert f"checkpoint {step4} is damaged" in printed.out + printed.err
    assert f"resumed from {out / 'sft' / 'step-2'}" in printed.out + printed.err
    assert json.loads((out / "sft" / "DONE").read_text())["steps"] == 6


def test_a_torn_metrics_line_and_an_unreadable_done_do_not_block_a_rerun(tmp_path, capsys):
    path = write_recipe(tiny_sft_recipe(max_steps=3), tmp_path / "r.yaml")
    out = tmp_path / "run"
    assert _run(path, out) == 0
    metrics = out / "sft" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')  # a crash mid-write
    (out / "sft" / "DONE").write_text('{"steps": 3, "ti')
    capsys.readouterr()
    assert _run(path, out) == 0
    err = capsys.readouterr().err
    assert "DONE is unreadable; the stage runs again" in err and "dropped a torn line" in err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[-1]["step"] == 3 and json.loads((out / "sft" / "DONE").read_text())["steps"] == 3


def test_a_run_that_diverges_on_its_last_step_fails_in_one_line_and_writes_no_done(tmp_path, capsys):
    path = write_recipe(tiny_sft_recipe(max_steps=1), tmp_path / "r.yaml")
    code = _run(path, tmp_path / "run", "optimizer.lr=1e30", "train.max_grad_norm=null")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("mmfactory: error: NonFiniteLossError: [sft]")
    assert "nothing was saved" in err[-1]
    assert (
        not (tmp_path / "run" / "sft" / "DONE").exists() and not (tmp_path / "run" / "sft" / "final").exists()
    )
