"""What every stage's ``final/`` holds for the tools outside mmfactory: a model card, and a tokenizer whose
``chat_template`` renders what the model was trained on, so transformers' own classes generate from it."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmfactory.cli import main
from mmfactory.data.chat import TEMPLATES, generation_prompt
from mmfactory.lineage import dir_fingerprint
from tests.helpers import tiny_sft_recipe, write_recipe


def test_final_has_a_model_card_and_generates_through_transformers_with_its_chat_template(tmp_path):
    recipe = write_recipe(tiny_sft_recipe(max_steps=3), tmp_path / "r.yaml")
    assert main(["run", str(recipe), "--output", str(tmp_path / "run")]) == 0
    stage = tmp_path / "run" / "sft"
    final = stage / "final"

    card = (final / "README.md").read_text()
    done = json.loads((stage / "DONE").read_text())
    assert card.startswith("---\nlibrary_name: transformers\ntags: [mmfactory, causal_lm_sft]\n---\n")
    assert (
        "# test/sft / sft" in card and "- `train`: format: world, kind: chat, split: train, size: 96" in card
    )
    assert f"| eval_loss | {done['metrics']['eval_loss']:.4g} |" in card
    assert "_per_s" not in card  # host-dependent numbers stay out: retraining writes the same card
    assert done["fingerprint"] == dir_fingerprint(final)  # the card is not part of the model's fingerprint

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    messages = [{"role": "user", "content": "What is left of the blue square?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == generation_prompt(messages, tokenizer, TEMPLATES["chatml"])
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(ids)


def test_template_auto_trains_with_the_tokenizers_own_template_and_names_its_throughput(tmp_path, capsys):
    recipe = tiny_sft_recipe(max_steps=2)
    recipe["stages"][0]["data"]["template"] = "auto"  # the world tokenizer's own ChatML template
    assert (
        main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(tmp_path / "run")]) == 0
    )
    final = tmp_path / "run" / "sft" / "final"
    assert json.loads((final / "mmfactory_chat.json").read_text()) == {"template": "auto"}
    records = [json.loads(line) for line in (tmp_path / "run/sft/metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss_tokens_per_s"] > 0  # labelled tokens: what the loss averages over
    assert records[0]["input_tokens_per_s"] > records[0]["loss_tokens_per_s"]  # prompts count as inputs
    capsys.readouterr()
    assert main(["generate", "--model", str(final), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert ">>> Hi" in capsys.readouterr().out
