"""lm/tiny-style SFT through the real CLI: learning happens, frozen parameters stay put."""

import json

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from mmfactory.cli import main
from mmfactory.models.lm import CausalLMConfig, load_causal_lm
from tests.helpers import TINY_LM, tiny_sft_recipe, write_recipe


def _initial_state():
    set_seed(0)  # the runner seeds the stage before the task builds its model
    model, _ = load_causal_lm(CausalLMConfig(tiny=dict(TINY_LM)))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sft_through_cli_learns_and_respects_frozen(tmp_path, capsys):
    recipe = tiny_sft_recipe(max_steps=30, log_every=5)
    recipe["stages"][0]["frozen"] = ["model.model.layers.0.*"]
    path = write_recipe(recipe, tmp_path / "r.yaml")
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Results of test/sft" in printed and "sft/eval_loss" in printed

    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["sft/train_first_loss"] > metrics["sft/train_loss"] + 1.0  # the loss fell
    assert metrics["sft/eval_loss"] < metrics["sft/train_first_loss"] - 1.0
    losses = [
        json.loads(line)["loss"]
        for line in (out / "sft/metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert all(torch.isfinite(torch.tensor(losses)))

    final = load_file(out / "sft/final/model.safetensors")
    initial = _initial_state()
    for name, value in final.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(value, initial[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(value, initial[name]), f"trainable {name} did not change"
    assert (out / "sft/DONE").is_file() and not list((out / "sft").glob("step-*"))

    # Re-running skips the finished stage and prints the same results.
    assert main(["run", str(path), "--output", str(out)]) == 0
    assert "already done: skipped" in capsys.readouterr().out


def test_changed_config_is_refused_for_an_existing_stage(tmp_path, capsys):
    path = write_recipe(tiny_sft_recipe(max_steps=2), tmp_path / "r.yaml")
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out)]) == 0
    assert main(["run", str(path), "--output", str(out), "optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmfactory: configuration error: ")
    assert "produced by a different configuration" in err
    # A folder written before a config field existed (here: train.ema_decay) is the same configuration.
    saved = out / "sft" / "config.yaml"
    saved.write_text("".join(line for line in saved.read_text().splitlines(True) if "ema_decay" not in line))
    assert main(["run", str(path), "--output", str(out)]) == 0
    assert "already done: skipped" in capsys.readouterr().out


def test_config_errors_exit_2_with_the_key_path(tmp_path, capsys):
    path = write_recipe(tiny_sft_recipe(), tmp_path / "r.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / "x"), "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "stages[0].train.max_step: unknown key (did you mean 'max_steps'?)" in err


def test_local_folder_model_and_init_from_chain(tmp_path, capsys):
    """A tiny Qwen2 saved to a folder loads like a real checkpoint; stage b starts from stage a's output."""
    set_seed(1)
    model, tokenizer = load_causal_lm(CausalLMConfig(tiny=dict(TINY_LM)))
    folder = tmp_path / "qwen2-tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    recipe = tiny_sft_recipe(max_steps=3)
    stage_a = recipe["stages"][0]
    stage_a.update(name="a", model={"path": str(folder)})
    # an lr far below float32 resolution and no weight decay: stage b must end exactly where a ended
    stage_b = {**stage_a, "name": "b", "model": {}, "init_from": "a", "optimizer": {"lr": 1e-30}}
    recipe["stages"] = [stage_a, stage_b]
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 0

    a = load_file(out / "a/final/model.safetensors")
    b = load_file(out / "b/final/model.safetensors")
    saved = load_file(folder / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], saved[k]) for k in a)  # stage a trained the loaded weights

    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(out / "b/final"),
                "--prompt",
                "Hi",
                "--prompt",
                "Hello?",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count(">>> ") == 2 and ">>> Hello?" in printed


def test_chat_jsonl_bad_lines_error_or_are_skipped_and_counted(tmp_path, capsys):
    turns = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "ok"}]
    good = [{"id": i, "messages": turns} for i in range(16)]
    lines = [json.dumps(r) for r in good]
    lines.insert(3, '{"id": "broken", "messages": [')  # malformed JSON on line 4
    lines.insert(6, json.dumps({"id": "empty", "messages": [{"role": "user", "content": ""}]}))
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    recipe = tiny_sft_recipe(max_steps=2)
    for policy in ("error", "skip"):
        source = {"format": "messages", "path": str(data), "on_bad_sample": policy}
        recipe["stages"][0]["data"] = {"train": [source], "eval": [], "max_length": 32}
        write_recipe(recipe, tmp_path / f"{policy}.yaml")

    # one line naming file and line, no traceback
    assert main(["run", str(tmp_path / "error.yaml"), "--output", str(tmp_path / "strict")]) == 2
    assert "chat.jsonl, line 4: malformed JSON" in capsys.readouterr().err

    out = tmp_path / "lenient"
    assert main(["run", str(tmp_path / "skip.yaml"), "--output", str(out)]) == 0
    data_report = json.loads((out / "results.json").read_text())["stages"]["sft"]["data"]
    assert data_report["train/samples"] == 16
    assert data_report["train/bad_malformed_json"] == data_report["train/bad_empty_text"] == 1
    printed = capsys.readouterr()
    assert "sft data:" in printed.out
    # the skip report, with the examples' locations, is printed as soon as the file is read
    assert "skipped 2 bad samples" in printed.err and "chat.jsonl, line 7" in printed.err


def test_a_source_of_the_wrong_kind_in_a_later_stage_is_refused_before_anything_trains(tmp_path, capsys):
    recipe = tiny_sft_recipe(max_steps=2)
    second = {**recipe["stages"][0], "name": "second", "init_from": "sft", "model": {}}
    second["data"] = {**second["data"], "train": [{"format": "world", "kind": "vqa", "size": 8}]}
    recipe["stages"].append(second)
    path = write_recipe(recipe, tmp_path / "r.yaml")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 2
    assert (
        "stages[1].data.train[0]: world kind 'vqa' yields image-chat samples, this task reads 'chat'"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "sft").exists()
