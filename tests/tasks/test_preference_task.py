"""causal_lm_dpo: the task's loss against a naive per-sequence DPO in forward and gradient, and a
stage that trains the policy while the frozen reference stays bit-identical."""

import json
import math

import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image

from mmfactory.cli import main
from mmfactory.config import ConfigError, StageConfig, TrainConfig
from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.runner import _make_accelerator
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.train.loop import train_stage
from tests.helpers import TINY_LM, world_data, write_recipe


def _stage(tmp_path, options=None, model=None, data=None, **train) -> tuple[StageConfig, StageContext]:
    stage = StageConfig(
        name="dpo",
        task="causal_lm_dpo",
        model=model or {"tiny": dict(TINY_LM)},
        data={
            **world_data(["article_preference"], 24, 4, languages=["en", "zh"]),
            "max_length": 96,
            **(data or {}),
        },
        options=options or {},
        train=TrainConfig(**{"max_steps": 6, "batch_size": 4, "log_every": 1, **train}),
    )
    stage_dir = tmp_path / "dpo"
    stage_dir.mkdir(parents=True, exist_ok=True)
    return stage, StageContext(tmp_path, stage_dir)


def _naive_logps(model, input_ids, labels) -> torch.Tensor:
    """Each sequence alone, unpadded: sum over reply tokens t of log softmax(logits[t-1])[token t]."""
    out = []
    for ids, labs in zip(input_ids, labels, strict=True):
        length = int((labs != IGNORE_INDEX).nonzero().max()) + 1
        logits = model(input_ids=ids[None, :length]).logits[0].double()
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, length):
            if labs[t] != IGNORE_INDEX:
                total = total + torch.log_softmax(logits[t - 1], -1)[labs[t]]
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize(("loss", "sft_weight"), [("sigmoid", 0.0), ("kto_pair", 0.0), ("sigmoid", 0.5)])
def test_dpo_loss_and_gradient_match_naive(tmp_path, loss, sft_weight):
    set_seed(0)
    stage, ctx = _stage(tmp_path, options={"dpo": {"loss": loss, "beta": 0.5, "sft_weight": sft_weight}})
    task = build_task(stage, 0, ctx).double()  # float64: the comparison is exact up to summation order
    with torch.no_grad():  # move the policy away from the reference so the log-ratios are not zero
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = task.collate(task.train_dataset()[:3])
    assert batch["input_ids"].shape[0] == 6 and task.loss_weight(batch) == 3

    out = task(batch)
    grads = torch.autograd.grad(out["loss"], list(task.model.parameters()))

    policy = _naive_logps(task.model, batch["input_ids"], batch["labels"])
    with torch.no_grad():
        ref = _naive_logps(task.reference, batch["input_ids"], batch["labels"])
    r_w, r_l = policy[:3] - ref[:3], policy[3:] - ref[3:]
    if loss == "sigmoid":
        expected = torch.stack(
            [-torch.log(torch.sigmoid(0.5 * (w - l))) for w, l in zip(r_w, r_l, strict=True)]
        ).mean()
    else:
        z_w, z_l = r_w.detach().mean().clamp(min=0), r_l.detach().mean().clamp(min=0)
        terms = [1 - torch.sigmoid(0.5 * (w - z_l)) for w in r_w] + [
            1 - torch.sigmoid(0.5 * (z_w - l)) for l in r_l
        ]
        expected = torch.stack(terms).mean()
    if sft_weight:  # RPO: plus the NLL of the chosen replies, averaged over their tokens
        chosen_tokens = (batch["labels"][:3, 1:] != IGNORE_INDEX).sum()
        expected = expected - sft_weight * policy[:3].sum() / chosen_tokens
    expected_grads = torch.autograd.grad(expected, list(task.model.parameters()))

    torch.testing.assert_close(out["loss"], expected, rtol=1e-9, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(out["reward_chosen"], 0.5 * r_w.detach().mean(), rtol=1e-9, atol=1e-12)
    assert out["reward_accuracy"].item() == pytest.approx((r_w > r_l).double().mean().item())


def test_dpo_stage_trains_policy_and_keeps_reference_bit_identical(tmp_path):
    set_seed(0)
    stage, ctx = _stage(tmp_path, max_steps=12)
    stage.optimizer.lr = 3e-3
    accelerator = _make_accelerator(stage)
    task = build_task(stage, 0, ctx)
    reference_before = {k: v.clone() for k, v in task.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in task.model.state_dict().items()}

    summary, _ = train_stage(task, stage, ctx.stage_dir, accelerator)

    assert summary["metrics"]["train_first_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == ref
    assert summary["metrics"]["train_loss"] < summary["metrics"]["train_first_loss"] - 0.05
    assert summary["metrics"]["eval_reward_margin"] > 0
    assert not task.reference.training and all(not p.requires_grad for p in task.reference.parameters())
    for name, value in task.reference.state_dict().items():
        assert torch.equal(value, reference_before[name]), f"reference {name} changed"
    changed = [not torch.equal(v, policy_before[k]) for k, v in task.model.state_dict().items()]
    assert all(changed)


def test_reference_must_share_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<unk>").save_pretrained(tmp_path / "tok")
    model = {"tiny": dict(TINY_LM), "reference": {"tiny": dict(TINY_LM), "tokenizer": str(tmp_path / "tok")}}
    stage, ctx = _stage(tmp_path, model=model)
    with pytest.raises(ConfigError, match="vocabulary differs"):
        build_task(stage, 0, ctx)

    set_seed(0)
    stage, ctx = _stage(
        tmp_path, model={"tiny": dict(TINY_LM), "reference": {"tiny": {**TINY_LM, "hidden_size": 48}}}
    )
    task = build_task(stage, 0, ctx)
    assert task.reference.config.hidden_size == 48 and task.model.config.hidden_size == 32


def test_jsonl_pairs_and_refusals(tmp_path):
    pairs = [{"id": i, "prompt": f"Say {i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs) + "{not json\n")
    source = {"format": "preference", "path": str(path), "on_bad_sample": "skip"}
    stage, ctx = _stage(tmp_path, data={"train": [source], "eval": []})
    task = build_task(stage, 0, ctx)
    assert len(task.train_dataset()) == 3 and task.eval_dataset() is None
    assert task.data_report()["train/bad_malformed_json"] == 1

    with pytest.raises(ConfigError, match="options.dpo.label_smoothing: only the sigmoid loss"):
        build_task(_stage(tmp_path, options={"dpo": {"loss": "kto_pair", "label_smoothing": 0.1}})[0], 0, ctx)

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    refused = [
        ({**pairs[0], "image": "a.png"}, "sample 0 has an image; this task reads text pairs"),
        (
            {"id": "k", "prompt": "Hi", "completion": "Hello", "label": True},
            "sample 'k' is an unpaired KTO row",
        ),
    ]
    for record, message in refused:
        path.write_text(json.dumps(record) + "\n")
        task = build_task(_stage(tmp_path, data={"train": [source], "eval": []})[0], 0, ctx)
        with pytest.raises(ConfigError, match=message):
            task.train_dataset()


def test_kto_pair_reference_point_detachment_is_a_recipe_option():
    from mmfactory.losses.preference import kto_pair_loss
    from mmfactory.tasks.preference import DPOOptions, preference_objective

    torch.manual_seed(0)
    policy = torch.randn(8, requires_grad=True)
    reference, tokens = torch.randn(8), torch.full((8,), 5)
    grads = {}
    for detach in (True, False):
        out = preference_objective(
            DPOOptions(loss="kto_pair", detach_reference_point=detach), policy, reference, tokens
        )
        (grads[detach],) = torch.autograd.grad(out["loss"], policy)
        expected = kto_pair_loss(*policy.chunk(2), *reference.chunk(2), 0.1, detach)[0]
        (reference_grad,) = torch.autograd.grad(expected, policy)
        torch.testing.assert_close(grads[detach], reference_grad)
    assert not torch.allclose(grads[True], grads[False])  # the reference points carry gradient when attached
    with pytest.raises(ConfigError, match="detach_reference_point: only the kto_pair loss"):
        DPOOptions(loss="sigmoid", detach_reference_point=False).validate()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dpo": {"betta": 0.5}}, "stages[0].options.dpo.betta: unknown key (did you mean 'beta'?)"),
        ({"beta": 0.5}, "stages[0].options.beta: unknown key (did you mean 'dpo.beta'?)"),  # the old flat key
        (
            {"dpo": {"beta": 0.5}, "sft_weight": 1.0},
            "stages[0].options.sft_weight: unknown key (did you mean 'dpo.sft_weight'?)",
        ),
        ({"dpo": {"beta": 0.0}}, "stages[0].options.dpo.beta: must be > 0, got 0.0"),
    ],
)
def test_dpo_options_are_a_group_and_bad_keys_stop_the_run_before_training(
    tmp_path, capsys, options, message
):
    """causal_lm_dpo's options are ``dpo`` (the loss) and ``lora``: a misspelt key in the group, a flat loss
    key of the old schema and an out-of-range value are each refused before anything trains."""
    stage = _stage(tmp_path)[0]
    dpo = {"name": "dpo", "task": "causal_lm_dpo", "model": stage.model, "data": stage.data}
    recipe = {"name": "test/dpo", "stages": [{**dpo, "options": options, "train": {"max_steps": 2}}]}
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "dpo" / "metrics.jsonl").exists() and not (out / "dpo" / "DONE").exists()
