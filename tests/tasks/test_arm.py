"""ARM tasks: pixel losses and label-smoothed cross-entropy against naive references (forward and gradient),
layer-wise lr decay groups, and fine-tuning initialised from a pretraining stage's output."""

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image

from mmfactory.config import ConfigError, OptimizerConfig, StageConfig, TrainConfig
from mmfactory.data.policy import BadSampleError, DataError
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.train.optim import build_optimizer
from tests.helpers import world_data

ENCODER = {"hidden_size": 32, "num_layers": 3, "image_size": 16, "patch_size": 4}
DECODER = {"hidden_size": 16, "num_layers": 2, "num_heads": 2}
DATA = world_data(["labelled"], 12, 4, image_size=16)


def _task(tmp_path, task: str, model: dict, options: dict | None = None, init_from=None, outputs=None):
    stage = StageConfig(
        name=task,
        task=task,
        model=model,
        data=dict(DATA),
        options=options or {},
        init_from=init_from,
        train=TrainConfig(max_steps=1),
    )
    ctx = StageContext(tmp_path, tmp_path / task, dict(outputs or {}))
    set_seed(0)
    return build_task(stage, 0, ctx)


def _batch(task, n: int = 4) -> dict[str, torch.Tensor]:
    return task.collate([task.train_dataset()[i] for i in range(n)])


@pytest.mark.parametrize(
    ("task_name", "extra"), [("arm_pretrain", {"cluster_size": 2}), ("arm_mae_pretrain", {"mask_ratio": 0.5})]
)
def test_pretraining_loss_is_the_mse_of_normalised_pixels(tmp_path, task_name, extra):
    task = _task(tmp_path, task_name, {"encoder": ENCODER, "decoder": DECODER, **extra}).double()
    batch = _batch(task)
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 16, 16, 3)
    torch.manual_seed(5)
    loss = task(batch)["loss"]
    torch.manual_seed(5)  # the MAE mask comes from the global RNG: the same one again
    pred, target = task.model(batch["images"])
    naive = sum((p - t) ** 2 for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True))
    assert loss.item() == pytest.approx(naive / pred.numel(), rel=1e-9)
    params = [p for p in task.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(((pred - target) ** 2).sum() / pred.numel(), params, allow_unused=True)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref)
    assert task.loss_unit == "images"


def test_finetune_loss_is_label_smoothed_cross_entropy(tmp_path):
    model = {"encoder": ENCODER, "drop_path": 0.0}  # stochastic depth would make two forwards differ
    task = _task(tmp_path, "arm_finetune", model, {"label_smoothing": 0.2}).double()
    batch = _batch(task, 6)
    out = task(batch)
    logits = task.model(batch["images"])
    num_classes = logits.shape[1]
    assert num_classes == 4  # world counts 1..4
    naive = 0.0
    for row, label in zip(logits, batch["labels"].tolist(), strict=True):
        log_probs = torch.log_softmax(row, -1)
        target = [0.2 / num_classes + (0.8 if k == label else 0.0) for k in range(num_classes)]
        naive = naive - sum(t * lp for t, lp in zip(target, log_probs, strict=True)) / len(batch["labels"])
    torch.testing.assert_close(out["loss"], naive)
    params = [p for p in task.parameters() if p.requires_grad]
    for grad, ref in zip(
        torch.autograd.grad(out["loss"], params), torch.autograd.grad(naive, params), strict=True
    ):
        torch.testing.assert_close(grad, ref)
    expected_accuracy = (logits.argmax(-1) == batch["labels"]).double().mean()
    assert out["accuracy"].item() == pytest.approx(expected_accuracy.item())


def test_layer_wise_lr_decay_groups(tmp_path):
    task = _task(
        tmp_path, "arm_finetune", {"encoder": ENCODER, "scans": ["forward", "backward"]}, {"layer_decay": 0.5}
    )
    optimizer = build_optimizer(task, OptimizerConfig(lr=0.1, weight_decay=0.05))
    depth_of = {id(p): task.model.layer_id(n.removeprefix("model.")) for n, p in task.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            seen.add(id(param))
            assert group["lr"] == pytest.approx(0.1 * 0.5 ** (3 + 1 - depth_of[id(param)]))
            decays = param.ndim >= 2 and not getattr(param, "_no_weight_decay", False)  # A_log is exempt
            assert group["weight_decay"] == (0.05 if decays else 0.0)
    assert seen == set(depth_of)  # every parameter in exactly one group
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(
        0.1
    )  # head/norm first, at the full rate
    assert sorted({round(lr, 8) for lr in lrs}) == [
        0.00625,
        0.0125,
        0.025,
        0.05,
        0.1,
    ]  # 0.1 * 0.5^k, k = 0..4
    assert task.lr_scale("model.encoder.patch_embed.weight") == pytest.approx(0.5**4)


def test_finetune_transfers_encoder_weights_from_a_pretraining_stage(tmp_path):
    pretrain = _task(tmp_path, "arm_pretrain", {"encoder": ENCODER, "decoder": DECODER, "cluster_size": 2})
    with torch.no_grad():
        for param in pretrain.model.encoder.parameters():
            param.add_(0.01)  # differ from any fresh init
    pretrain.save_pretrained(tmp_path / "pretrain_out")
    outputs = {"pretrain": tmp_path / "pretrain_out"}
    model = {"scans": ["forward", "column"]}
    task = _task(tmp_path, "arm_finetune", model, init_from="pretrain", outputs=outputs)
    source = pretrain.model.encoder.state_dict()
    for name, value in task.model.encoder.state_dict().items():
        key = name.replace(".extra_scans.column.", ".mixer.")
        assert torch.equal(value, source[key]), name
    scratch = _task(tmp_path, "arm_finetune", {"encoder": ENCODER})
    assert not torch.equal(scratch.model.encoder.patch_embed.weight, task.model.encoder.patch_embed.weight)
    with pytest.raises(ConfigError, match=r"\['num_layers'\] differ from the encoder of init_from"):
        _task(
            tmp_path,
            "arm_finetune",
            {"encoder": {**ENCODER, "num_layers": 2}},
            init_from="pretrain",
            outputs=outputs,
        )
    with pytest.raises(ConfigError, match="pretraining starts from scratch"):
        _task(
            tmp_path,
            "arm_pretrain",
            {"encoder": ENCODER, "cluster_size": 2},
            init_from="pretrain",
            outputs=outputs,
        )
    with pytest.raises(ConfigError, match="model.encoder: needed"):
        _task(tmp_path, "arm_finetune", {})


def test_data_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train\[0\].labels: format 'idx' needs the labels file"):
        _task_with_data(tmp_path, {"train": [{"format": "idx", "path": "x.gz"}]})
    missing = {"format": "idx", "path": "/no/such/train-images.gz", "labels": "y"}
    with pytest.raises(BadSampleError, match="/no/such/train-images.gz: file not found"):
        _task_with_data(tmp_path, {"train": [missing], "eval": []})
    shapes = {"format": "world", "kind": "labelled", "label": "shape", "max_objects": 1, "image_size": 16}
    data = {
        "train": [{**shapes, "size": 12, "limit": 5, "subset": "random"}],
        "eval": [{**shapes, "size": 4}],
    }
    task = _task_with_data(tmp_path, data)
    assert len(task.train_dataset()) == 5 and len(task.eval_dataset()) == 4
    assert task.model.head.out_features == 8  # eight shapes
    assert task.data_report() == {"train/images": 5, "eval/images": 4}


def test_eval_labels_follow_the_training_classes_by_name(tmp_path):
    """An eval folder read on its own lacks a class: its labels are mapped onto the training classes."""
    for split, classes in (("train", ["cat", "dog", "fox"]), ("val", ["dog", "fox"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (len(name) * 20, 0, 0)).save(tmp_path / split / name / "a.png")
    data = {
        "train": [{"format": "folder", "path": str(tmp_path / "train")}],
        "eval": [{"format": "folder", "path": str(tmp_path / "val")}],
    }
    task = _task_with_data(tmp_path, data)
    assert [task.eval_dataset()[i]["label"] for i in range(2)] == [1, 2]  # dog, fox of cat/dog/fox
    assert task.eval_dataset()[0]["image"].shape == (16, 16, 3)  # fitted to the encoder
    (tmp_path / "val" / "owl").mkdir()
    with pytest.raises(DataError, match=r"data.eval: classes \['owl'\] are not among"):
        _task_with_data(tmp_path, data).eval_dataset()


def _task_with_data(tmp_path, data: dict):
    stage = StageConfig(name="ft", task="arm_finetune", model={"encoder": ENCODER}, data=data)
    return build_task(stage, 0, StageContext(tmp_path, tmp_path / "ft"))


def test_finetune_at_a_higher_resolution_interpolates_the_pretraining_positions(tmp_path):
    pretrain = _task(tmp_path, "arm_pretrain", {"encoder": ENCODER, "decoder": DECODER, "cluster_size": 2})
    pretrain.save_pretrained(tmp_path / "pretrain_out")
    outputs = {"pretrain": tmp_path / "pretrain_out"}
    data = world_data(["labelled"], 12, 4, image_size=24)
    stage = StageConfig(
        name="ft",
        task="arm_finetune",
        model={"image_size": 24},
        data=data,
        init_from="pretrain",
        train=TrainConfig(max_steps=1),
    )
    task = build_task(stage, 0, StageContext(tmp_path, tmp_path / "ft", outputs))
    assert task.encoder_config.image_size == 24 and task.model.pos_embed.shape == (37, 32)  # 6x6 + class
    source = pretrain.model.encoder.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in task.model.encoder.state_dict().items())
    batch = _batch(task)
    assert batch["images"].shape == (4, 24, 24, 3) and task(batch)["loss"].isfinite()
    with pytest.raises(ConfigError, match="image_size: 26 is not a multiple of patch_size 4"):
        build_task(
            StageConfig(
                name="ft", task="arm_finetune", model={"image_size": 26}, data=data, init_from="pretrain"
            ),
            0,
            StageContext(tmp_path, tmp_path / "ft", outputs),
        )


def test_training_images_are_augmented_and_eval_images_are_not(tmp_path):
    finetune = _task(tmp_path, "arm_finetune", {"encoder": ENCODER})
    assert finetune.options.augment.crop_scale == [0.08, 1.0] and finetune.options.augment.erase_prob == 0.25
    raw = finetune.labelled("train")[0][0]["image"]
    torch.manual_seed(0)
    assert not np.array_equal(finetune.train_dataset()[0]["image"], raw)
    assert np.array_equal(finetune.eval_dataset()[0]["image"], finetune.labelled("eval")[0][0]["image"])
    pretrain = _task(tmp_path, "arm_pretrain", {"encoder": ENCODER, "cluster_size": 2})
    assert pretrain.options.augment.crop_scale == [0.2, 1.0] and pretrain.options.augment.flip
    plain = _task(tmp_path, "arm_finetune", {"encoder": ENCODER}, options={"augment": {}})
    assert np.array_equal(plain.train_dataset()[0]["image"], raw)
