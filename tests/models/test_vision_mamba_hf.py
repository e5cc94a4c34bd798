"""The vision-Mamba models as Hugging Face models: ``save_pretrained`` / ``AutoModel.from_pretrained`` round
trips, folders written before they were ``PreTrainedModel`` s, strict loading, init left alone by
``post_init``."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

import mmfactory.models.vision_mamba  # noqa: F401  (registers the three models with the Auto classes)
from mmfactory.config import ConfigError
from mmfactory.models.vision_mamba import (
    ARMPretrainingConfig,
    ARMPretrainingModel,
    MaskedPretrainingConfig,
    MaskedPretrainingModel,
    PixelDecoderConfig,
    VisionMambaClassifier,
    VisionMambaClassifierConfig,
    VisionMambaConfig,
    VisionMambaPreTrainedModel,
    load_pretrained,
)

# Non-default fields throughout, so that a field lost on the way would show.
ENCODER = dict(hidden_size=32, num_layers=3, image_size=16, patch_size=4, in_channels=1)
ENCODER |= dict(pixel_mean=[0.5], pixel_std=[0.25])
DECODER = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_ratio=2.0, encoder_layers=[1, 3])
KINDS = {
    "arm": (ARMPretrainingModel, ARMPretrainingConfig, {"cluster_size": 2}),
    "mae": (MaskedPretrainingModel, MaskedPretrainingConfig, {"mask_ratio": 0.5}),
    "cls": (
        VisionMambaClassifier,
        VisionMambaClassifierConfig,
        {
            "num_classes": 4,
            "scans": ["forward", "backward"],
            "class_names": list("abcd"),
            "pooling": "cls",
            "drop_path": 0.1,
        },
    ),
}


def build(kind: str, seed: int = 0) -> VisionMambaPreTrainedModel:
    model_class, config_class, fields = KINDS[kind]
    decoder = {} if kind == "cls" else {"decoder": PixelDecoderConfig(**DECODER)}
    torch.manual_seed(seed)
    return model_class(config_class(encoder=VisionMambaConfig(**ENCODER), **decoder, **fields)).eval()


def images(batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 16, 16, 1), dtype=torch.uint8, generator=generator)


def output(model: VisionMambaPreTrainedModel) -> torch.Tensor:
    """Predictions ``[B, M, P * P * C]`` (the MAE's mask from a fixed generator) or logits ``[B, K]``."""
    if isinstance(model, MaskedPretrainingModel):
        return model(images(), torch.Generator().manual_seed(1))[0]
    out = model(images())
    return out[0] if isinstance(out, tuple) else out


def assert_same_model(loaded: VisionMambaPreTrainedModel, model: VisionMambaPreTrainedModel) -> None:
    assert type(loaded) is type(model)
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    for (name, buffer), (_, ref) in zip(loaded.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(buffer, ref), name  # not saved: recomputed on loading
    with torch.no_grad():
        torch.testing.assert_close(output(loaded), output(model), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trips_through_auto_model(tmp_path, kind):
    model = build(kind)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = AutoModel.from_pretrained(tmp_path)
    assert_same_model(loaded, model)
    assert type(AutoConfig.from_pretrained(tmp_path)) is KINDS[kind][1]
    # the nested dataclass configs come back as they went in
    assert loaded.encoder.config == VisionMambaConfig(**ENCODER)
    assert loaded.config.encoder_config == VisionMambaConfig(**ENCODER)
    if kind != "cls":
        assert loaded.config.decoder_config == PixelDecoderConfig(**DECODER)
        assert loaded.decoder.layers == [1, 3]
    else:
        assert loaded.class_names == list("abcd") and loaded.encoder.scans == ("forward", "backward")
        assert [b.drop_path.rate for b in loaded.encoder.blocks] == pytest.approx([0.0, 0.0, 0.05])
    assert load_pretrained(tmp_path).config.to_dict() == loaded.config.to_dict()


def _write_old_format(model: VisionMambaPreTrainedModel, kind: str, path) -> None:
    """The folder the pre-``PreTrainedModel`` ``save_pretrained`` wrote: ``config.json`` holding
    ``model_type`` and the constructor's fields (no transformers keys), weights without metadata."""
    encoder = VisionMambaConfig(**ENCODER)
    encoder.validate()
    fields = {
        "arm": {"decoder": dataclasses.asdict(PixelDecoderConfig(**DECODER)), "cluster_size": 2},
        "mae": {"decoder": dataclasses.asdict(PixelDecoderConfig(**DECODER)), "mask_ratio": 0.5},
        "cls": KINDS["cls"][2],
    }[kind]
    model_type = {
        "arm": "mmfactory_arm_pretraining",
        "mae": "mmfactory_vision_mamba_mae",
        "cls": "mmfactory_vision_mamba_classifier",
    }[kind]
    path.mkdir()
    config = {"model_type": model_type, "encoder": dataclasses.asdict(encoder), **fields}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")


@pytest.mark.parametrize("kind", KINDS)
def test_folders_of_the_old_format_load_with_the_same_outputs(tmp_path, kind):
    model = build(kind)
    _write_old_format(model, kind, tmp_path / "old")
    assert_same_model(AutoModel.from_pretrained(tmp_path / "old"), model)
    assert_same_model(KINDS[kind][0].from_pretrained(tmp_path / "old"), model)
    assert_same_model(load_pretrained(tmp_path / "old"), model)


def test_post_init_leaves_the_built_weights_alone(monkeypatch):
    """The official init happens where the modules are built; Hugging Face's ``post_init`` (which would
    re-initialise every Linear with its own ``_init_weights``) changes no parameter, buffer or RNG draw."""
    built = {kind: (build(kind).state_dict(), torch.rand(3)) for kind in KINDS}
    monkeypatch.setattr(VisionMambaPreTrainedModel, "post_init", lambda self: None)
    for kind in KINDS:
        state, draw = built[kind]
        plain = build(kind).state_dict()
        assert all(torch.equal(state[k], plain[k]) for k in plain), kind
        assert torch.equal(draw, torch.rand(3))


def test_loading_keeps_no_weight_decay_marks_and_loads_in_another_dtype(tmp_path):
    """``from_pretrained`` swaps in new parameters: the marks ``build_optimizer`` reads are put back. Loaded
    in bfloat16, the model equals the saved one cast with ``.to`` (its computed buffers too)."""
    model = build("cls")
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)

    def marked(m):
        return [n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)]

    assert marked(loaded) == marked(model)
    assert {"cls_token", "pos_embed", "encoder.blocks.2.mixer.A_log"} <= set(marked(model))
    half = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    cast = model.to(torch.bfloat16)
    assert {b.dtype for b in half.buffers()} == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(output(half), output(cast), rtol=0, atol=0)


def test_folders_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    build("arm").save_pretrained(tmp_path / "arm")
    with pytest.raises(ValueError, match="holds a 'mmfactory_arm_pretraining' model, not 'mmfactory_vision"):
        MaskedPretrainingModel.from_pretrained(tmp_path / "arm")
    model = build("cls")
    state = model.state_dict()
    del state["norm.bias"]
    state["extra"] = torch.zeros(1)
    model.config.save_pretrained(tmp_path / "cls")
    save_file(state, tmp_path / "cls/model.safetensors")
    with pytest.raises(ValueError, match=r"missing_keys': \['norm.bias'\], 'unexpected_keys': \['extra'\]"):
        AutoModel.from_pretrained(tmp_path / "cls")
    config = json.loads((tmp_path / "cls/config.json").read_text())
    config["encoder"]["hidden_size"] = 30
    (tmp_path / "cls/config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"cls/config.json: encoder.hidden_size: .* multiple of 4, got 30"):
        VisionMambaClassifier.from_pretrained(tmp_path / "cls")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="holds a 'bert' model, not a vision Mamba"):
        load_pretrained(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        load_pretrained(tmp_path / "empty")


def test_import_mmfactory_auto_alone_lets_transformers_load_every_kind_of_final_folder(tmp_path):
    """A fresh interpreter that imports only ``mmfactory.auto`` and transformers loads a vision-Mamba
    classifier and a multimodal LM folder through ``AutoModel``."""
    import subprocess
    import sys

    build("cls").save_pretrained(tmp_path / "cls")
    code = (
        "import sys, mmfactory.auto\n"
        "from transformers import AutoModel\n"
        "print(type(AutoModel.from_pretrained(sys.argv[1])).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cls")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "VisionMambaClassifier"
