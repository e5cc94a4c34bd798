"""image_text_contrastive (CLIP): the loss against a hand-written InfoNCE, EOS pooling, the saved folder as a
LLaVA vision tower, retrieval and zero-shot wiring, file sources, config refusals, and a tiny CLI run."""

import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import processors
from transformers import AutoTokenizer

from mmfactory.cli import main
from mmfactory.config import ConfigError, StageConfig, TrainConfig
from mmfactory.data.world_source import shape_twin, world_captions, zero_shot_prompts
from mmfactory.models.clip import tokenize_for_clip
from mmfactory.models.vision import VisionTowerConfig, load_image_processor, load_vision_tower
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.world.scenes import COLORS, HELD_OUT, SHAPES, render_scene, scene_at
from tests.helpers import world_data, write_recipe

TINY_CLIP = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 30,
        "patch_size": 10,
    },
    "projection_dim": 16,
}


def clip_stage(train: int, steps: int, **extra) -> dict:
    """A recipe's first stage: TINY_CLIP trained on ``train`` world scenes (8 held out) for ``steps``."""
    data = world_data(["scenes"], train, 8)
    return {
        "name": "clip",
        "task": "image_text_contrastive",
        "model": {"tiny": TINY_CLIP},
        "data": data,
        "train": {"max_steps": steps},
        **extra,
    }


WORLD_DATA = world_data(["scenes"], 8, 6)


def make_task(tmp_path, model=None, data=None, init_from=None, **options):
    stage = StageConfig(
        name="s",
        task="image_text_contrastive",
        model={"tiny": TINY_CLIP} if model is None else model,
        data=WORLD_DATA if data is None else data,
        options=options,
        init_from=init_from,
        train=TrainConfig(max_steps=1, batch_size=4),
    )
    torch.manual_seed(0)
    return build_task(stage, 0, StageContext(tmp_path, tmp_path / "s"))


def train_batch(task, n=4):
    dataset = task.train_dataset()
    return task.collate([dataset[i] for i in range(n)])


def naive_infonce(images, texts, log_scale, max_scale=100.0):
    """Both directions of InfoNCE, one row at a time."""
    scale = torch.exp(torch.clamp(log_scale, 0.0, math.log(max_scale)))
    images = [x / x.norm() for x in images]
    texts = [t / t.norm() for t in texts]
    n = len(images)
    logits = [[scale * torch.dot(images[i], texts[j]) for j in range(n)] for i in range(n)]
    image_to_text = [-logits[i][i] + torch.logsumexp(torch.stack(logits[i]), 0) for i in range(n)]
    columns = [torch.stack([logits[i][j] for i in range(n)]) for j in range(n)]
    text_to_image = [-logits[j][j] + torch.logsumexp(columns[j], 0) for j in range(n)]
    return (sum(image_to_text) + sum(text_to_image)) / (2 * n)


def test_loss_matches_naive_infonce_in_value_and_gradient(tmp_path):
    task = make_task(tmp_path).double()
    batch = train_batch(task)
    batch["pixel_values"] = batch["pixel_values"].double()
    model = task.model
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    params = [p for p in task.parameters() if p.requires_grad]

    loss = task(batch)["loss"]
    got = torch.autograd.grad(loss, params)
    # Reference: features straight from the towers, the text pooled at the EOS found by hand.
    images = model.visual_projection(model.vision_model(batch["pixel_values"]).pooler_output)
    hidden = model.text_model(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    eos = [row.tolist().index(task.tokenizer.eos_token_id) for row in batch["input_ids"]]
    texts = model.text_projection(torch.stack([hidden[i, e] for i, e in enumerate(eos)]))
    want_loss = naive_infonce(images, texts, model.logit_scale)
    want = torch.autograd.grad(want_loss, params)

    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert any(g.abs().sum() > 0 for g in got)
    hf_loss = model(**batch, return_loss=True).loss  # transformers' own CLIP loss (no clamp needed at 30)
    torch.testing.assert_close(loss, hf_loss)


def test_captions_end_in_eos_and_the_text_is_pooled_there(tmp_path):
    task = make_task(tmp_path)
    tokenizer, text_config = task.tokenizer, task.model.config.text_config
    assert (text_config.eos_token_id, text_config.pad_token_id, text_config.bos_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
    )
    assert text_config.vocab_size == len(tokenizer)
    texts = ["A red star.", "A large blue circle at the top left, on a gray background.", "红色星形。"]
    tokens = tokenize_for_clip(tokenizer, texts, 64)
    lengths = tokens["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # padded rows of different lengths
    for row, length in zip(tokens["input_ids"], lengths, strict=True):
        assert row.tolist().index(tokenizer.eos_token_id) == length - 1  # one EOS, the last real token
    out = task.model.text_model(**tokens)
    eos_states = out.last_hidden_state[torch.arange(3), lengths - 1]
    torch.testing.assert_close(out.pooler_output, eos_states, rtol=0, atol=0)
    assert not torch.allclose(out.pooler_output, out.last_hidden_state[:, -1])

    # A tokenizer that appends EOS itself gets no second one; truncation keeps the EOS last.
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tokenizer.eos_token_id)]
    )
    again = tokenize_for_clip(tokenizer, texts, 64)
    torch.testing.assert_close(again["input_ids"], tokens["input_ids"])
    short = tokenize_for_clip(tokenizer, texts[:2], 4)["input_ids"]  # both captions are longer than 4
    assert short.shape == (2, 4) and (short[:, -1] == tokenizer.eos_token_id).all()


def test_saved_folder_is_a_llava_vision_tower_and_an_init_from(tmp_path):
    task = make_task(tmp_path).eval()
    batch = train_batch(task)
    with torch.no_grad():
        for param in task.model.vision_model.parameters():  # trained-looking weights, not the init
            param.add_(0.01 * torch.randn_like(param))
    out = tmp_path / "final"
    task.save_pretrained(out)

    tower = load_vision_tower(VisionTowerConfig(path=str(out)))
    assert type(tower).__name__ == "CLIPVisionModel"
    trained = task.model.vision_model.state_dict()
    loaded = tower.state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    processor = load_image_processor(out, image_size=999)  # the saved processor wins over the size given
    images = [task.image_captions("train").image(i) for i in range(4)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, batch["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(
            tower(pixel_values=pixels).last_hidden_state,
            task.model.vision_model(pixel_values=pixels).last_hidden_state,
        )
    assert AutoTokenizer.from_pretrained(out)("A red star.") == task.tokenizer("A red star.")

    reloaded = make_task(tmp_path, model={}, init_from=str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch)["loss"], task(batch)["loss"])


def test_a_text_config_that_would_not_pool_at_eos_is_refused(tmp_path):
    out = tmp_path / "final"
    make_task(tmp_path).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 5
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="would not be pooled at its EOS"):
        make_task(tmp_path, model={}, init_from=str(out))
    config["text_config"]["eos_token_id"] = 2  # legacy: argmax(input_ids), and EOS is not the largest id
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="would not be pooled at its EOS"):
        make_task(tmp_path, model={}, init_from=str(out))


def test_retrieval_maps_every_caption_to_its_image(tmp_path, monkeypatch):
    task = make_task(tmp_path, data=world_data(["scenes"], 8, 6, languages=["en", "zh"]), eval_batch_size=5)
    source = task.image_captions("eval")
    assert len(source) == 6 and all(len(c) == 4 for c in source.captions)  # en/zh x brief/detailed
    image_of = {text: i for i, captions in enumerate(source.captions) for text in captions}
    rendered = [source.image(i).tobytes() for i in range(len(source))]
    shift = 0

    def encode_images(images):
        return torch.eye(6)[[rendered.index(image.tobytes()) for image in images]]

    def encode_texts(texts):
        return torch.eye(6)[[(image_of[text] + shift) % 6 for text in texts]]

    monkeypatch.setattr(task, "encode_images", encode_images)
    monkeypatch.setattr(task, "encode_texts", encode_texts)
    metrics = task.retrieval()
    assert metrics["retrieval_images"] == 6 and metrics["retrieval_captions"] == 24
    assert metrics["t2i_R@1"] == metrics["i2t_R@1"] == 100.0 and metrics["t2i_MdR"] == 1.0
    shift = 1  # every caption now points at the next image
    assert task.retrieval()["t2i_R@1"] == 0.0


def test_zero_shot_labels_and_prompt_ensembles(tmp_path, monkeypatch):
    task = make_task(tmp_path, zeroshot={"size": 40})
    scenes = [scene_at(0, "test", i, max_objects=1) for i in range(40)]
    assert all(len(s.objects) == 1 for s in scenes)
    truth = {render_scene(s, 32).tobytes(): s.objects[0] for s in scenes}
    words = [*SHAPES, *COLORS]

    def encode_images(images):  # an oracle: one-hot shape + one-hot colour
        rows = [torch.eye(16)[words.index(truth[x.tobytes()].shape)] for x in images]
        rows = [
            r + torch.eye(16)[words.index(truth[x.tobytes()].color)]
            for r, x in zip(rows, images, strict=True)
        ]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def encode_texts(texts):
        rows = [
            sum(torch.eye(16)[k] for k, w in enumerate(words) if f" {w}" in f" {t.lower()}") for t in texts
        ]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    prompts = zero_shot_prompts("shape", "en")
    assert list(prompts) == list(SHAPES) and prompts["star"][0] == "A red star."
    assert sum(map(len, prompts.values())) == 64 - 8  # held-out shape/colour pairs are no prompts
    monkeypatch.setattr(task, "encode_images", encode_images)
    monkeypatch.setattr(task, "encode_texts", encode_texts)
    metrics = task.zero_shot()
    assert metrics == {
        "zeroshot_en_shape_acc": 100.0,
        "zeroshot_en_shape_balanced_acc": 100.0,
        "zeroshot_en_color_acc": 100.0,
        "zeroshot_en_color_balanced_acc": 100.0,
    }


def test_shape_twins_differ_only_in_shape():
    rng = np.random.default_rng(0)
    for i in range(200):
        scene = scene_at(0, "train", i)
        twin = shape_twin(scene, rng)
        assert twin.background == scene.background and len(twin.objects) == len(scene.objects)
        for obj, other in zip(scene.objects, twin.objects, strict=True):
            assert (obj.color, obj.size, obj.x, obj.y) == (other.color, other.size, other.x, other.y)
            assert obj.shape != other.shape and (other.shape, other.color) not in HELD_OUT
        assert len(twin.names()) == len(twin.objects)  # (shape, colour) pairs stay distinct


def layout(sample):
    return [(o.color, o.x, o.y) for o in sample["scene"].objects]


def test_shape_twin_batches_hold_the_fraction_and_replay_with_the_seed(tmp_path):
    data = world_data(["scenes"], 8, 6, languages=["en", "zh"], shape_twins=0.5)
    task = make_task(tmp_path, data=data)
    dataset = task.train_dataset()
    samples = [dataset[i] for i in range(8)]
    twinned = task.with_shape_twins(samples)
    assert len(twinned) == 8 and twinned[:6] == samples[:6]  # 0.5 of 8 images: 2 pairs
    for original, twin in zip(samples[:2], twinned[6:], strict=True):
        scene = twin["scene"]
        assert layout(twin) == layout(original)
        assert all(a.shape != b.shape for a, b in zip(scene.objects, original["scene"].objects, strict=True))
        index = original["caption_index"]
        assert (
            original["caption"]
            == world_captions(original["scene"], ["en", "zh"], ["brief", "detailed"])[index]
        )
        assert twin["caption"] == world_captions(scene, ["en", "zh"], ["brief", "detailed"])[index]
        assert (twin["image"] == render_scene(scene, 32)).all() and (twin["image"] != original["image"]).any()

    def batch(seed):
        torch.manual_seed(seed)
        return task.collate([dataset[i] for i in range(8)])

    first, again, other = batch(1), batch(1), batch(2)
    assert first["pixel_values"].shape[0] == first["input_ids"].shape[0] == 8
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    assert "scene" not in task.eval_dataset()[0]  # evaluation batches are left alone
    single = make_task(tmp_path, data={**WORLD_DATA, "shape_twins": 1.0})
    three = [single.train_dataset()[i] for i in range(3)]
    twinned = single.with_shape_twins(three)  # 3 images hold one pair
    assert twinned[:2] == three[:2] and layout(twinned[2]) == layout(three[0]) != layout(three[2])


def _write_pairs(root, rows):
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        Image.new("RGB", (40, 20), colour).save(root / f"{name}.png")
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with tarfile.open(root / "shard.tar", "w") as tar:
        for i, row in enumerate(rows):
            if (root / row["image"]).exists():
                tar.add(root / row["image"], f"{i:04d}.png")
                text = root / f"{i}.txt"
                text.write_text(row["text"])
                tar.add(text, f"{i:04d}.txt")


@pytest.mark.parametrize("source", ["pairs", "webdataset"])
def test_file_sources_group_captions_by_image(tmp_path, source):
    rows = [
        {"id": "1", "image": "a.png", "text": "a red picture"},
        {"id": "2", "image": "b.png", "text": "a blue picture"},
        {"id": "3", "image": "a.png", "text": "red everywhere"},
        {"id": "4", "image": "missing.png", "text": "nothing"},
    ]
    _write_pairs(tmp_path, rows)
    path = str(tmp_path / ("pairs.jsonl" if source == "pairs" else "shard.tar"))
    files = [{"format": source, "path": path, "on_bad_sample": "skip"}]
    data = {"train": files, "eval": files, "pad_square": True}
    task = make_task(tmp_path, data=data)
    train = task.image_captions("train")
    if source == "pairs":  # a webdataset member is its own image, so only the JSONL groups shared files
        assert train.captions == [["a red picture", "red everywhere"], ["a blue picture"]]
        assert task.data_report()["train/bad_missing_file"] == 1
    else:
        assert train.captions == [["a red picture"], ["a blue picture"], ["red everywhere"]]
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    assert batch["pixel_values"].shape == (2, 3, 30, 30)
    # pad_square: the 40 x 20 image sits on the mean colour, so the top row is not red
    assert batch["pixel_values"][0, 0, 0].std() < 1e-4 and batch["pixel_values"][0, 0, 0, 0] < 0.5
    metrics = task.eval().evaluate()
    assert metrics["retrieval_images"] == len(train) and "zeroshot_en_shape_acc" not in metrics


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (
            {"tiny": {**TINY_CLIP, "projection_dims": 8}},
            WORLD_DATA,
            "model.tiny.projection_dims: not a CLIPConfig",
        ),
        (
            {"tiny": {**TINY_CLIP, "vision_config": {"hidden_sise": 8}}},
            WORLD_DATA,
            "model.tiny.vision_config.hidden_sise: .*did you mean 'hidden_size'",
        ),
        (
            {"tiny": {**TINY_CLIP, "text_config": {"eos_token_id": 5}}},
            WORLD_DATA,
            "model.tiny.text_config.eos_token_id: set from the tokenizer",
        ),
        (
            {"tiny": TINY_CLIP},
            {"train": [{"format": "pairs"}]},
            r"data.train\[0\].path: format 'pairs' needs a path",
        ),
        ({"tiny": TINY_CLIP}, {"max_text_length": 65}, "data.max_text_length: 65 exceeds"),
        ({"tiny": TINY_CLIP}, {"shape_twins": 1.5}, "data.shape_twins: a fraction"),
        (
            {"tiny": TINY_CLIP},
            {"train": [{"format": "pairs", "path": "x.jsonl"}], "shape_twins": 0.5},
            "data.shape_twins: needs the world's scenes",
        ),
        ({}, WORLD_DATA, "model: set model.path, model.tiny or the stage's init_from"),
    ],
)
def test_config_errors_name_the_key(tmp_path, model, data, message):
    with pytest.raises(ConfigError, match=message):
        make_task(tmp_path, model=model, data=data)


def test_tiny_run_through_cli_learns(tmp_path):
    recipe = {
        "name": "test/clip",
        "stages": [
            {
                "name": "clip",
                "task": "image_text_contrastive",
                "model": {"tiny": TINY_CLIP},
                "data": world_data(["scenes"], 48, 16),
                "optimizer": {"lr": 3.0e-3},
                "schedule": {"kind": "constant", "warmup_steps": 0},
                "train": {"batch_size": 16, "max_steps": 150, "log_every": 1, "seed": 0},
                "options": {"zeroshot": {"size": 40}},
            }
        ],
    }
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "clip.yaml")), "--output", str(out)]) == 0
    logged = [json.loads(line) for line in (out / "clip" / "metrics.jsonl").read_text().splitlines()]
    losses = torch.tensor([r["loss"] for r in logged if "loss" in r])
    assert torch.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean() - 0.3
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["clip/retrieval_images"] == 16 and 1.0 <= metrics["clip/t2i_MdR"] <= 16.0
    assert 0.0 <= metrics["clip/zeroshot_en_shape_acc"] <= 100.0

    final = out / "clip" / "final"
    initial = make_task(tmp_path, data=recipe["stages"][0]["data"]).model.state_dict()
    task = make_task(tmp_path, model={}, data=recipe["stages"][0]["data"], init_from=str(final)).eval()
    for name, value in task.model.state_dict().items():
        assert not torch.equal(value, initial[name]), f"{name} did not change"
    train = task.image_captions("train")
    chance = 100.0 / len(train)
    retrieval = task.retrieval(train)
    assert retrieval["t2i_R@1"] > 3 * chance and retrieval["i2t_R@1"] > 3 * chance
    images = [train.image(i) for i in range(len(train))]
    matched = task.clip_scores(images, [c[0] for c in train.captions])
    shuffled = task.clip_scores(images, [c[0] for c in train.captions[1:] + train.captions[:1]])
    assert matched.abs().max() <= 1.0 + 1e-5 and matched.mean() > shuffled.mean() + 0.1


def test_cell_head_labels_its_cells_and_adds_its_loss(tmp_path):
    task = make_task(tmp_path, cell_head={"weight": 0.5}).double()
    dataset = task.train_dataset()
    samples = [dataset[i] for i in range(4)]
    batch = task.collate(samples)
    for sample, cells in zip(samples, batch["cells"], strict=True):
        occupied = {int(k) for k in torch.nonzero(cells[:, 0]).flatten()}
        assert len(occupied) == len(sample["scene"].objects)
        for obj in sample["scene"].objects:
            row, col = min(int(obj.y * 3), 2), min(int(obj.x * 3), 2)
            assert cells[3 * row + col].tolist() == [
                SHAPES.index(obj.shape) + 1,
                list(COLORS).index(obj.color) + 1,
            ]
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    out = task(batch)
    contrastive = task({k: v for k, v in batch.items() if k != "cells"})["loss"]
    hidden = task.model.vision_model(batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
    naive = []
    for a, head in enumerate(task.cell_head):  # one patch per cell at 30 / 10 pixels
        logits = head(hidden[:, 1:])
        naive.append(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["cells"][..., a].flatten())
        )
    torch.testing.assert_close(out["loss"], contrastive + 0.5 * (naive[0] + naive[1]) / 2)
    assert "cells" not in task.collate([task.eval_dataset()[i] for i in range(2)])


def test_cell_head_learns_the_layout_and_reports_its_accuracy(tmp_path):
    data = world_data(["scenes"], 64, 32)
    task = make_task(tmp_path, data=data, cell_head={"weight": 1.0})
    before = task.cell_accuracy()
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    dataset = task.train_dataset()
    torch.manual_seed(0)
    losses = []
    for step in range(150):
        batch = task.collate([dataset[(16 * step + i) % len(dataset)] for i in range(16)])
        out = task(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["cell_loss"].item())
    after = task.cell_accuracy()
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert after["cell_empty_acc"] > 90.0 and after["cell_color_acc"] > before["cell_color_acc"] + 20.0


@pytest.mark.parametrize(
    "data, cell_head, message",
    [
        (
            {"train": [{"format": "pairs", "path": "x.jsonl"}]},
            {},
            "options.cell_head: needs the world's scenes",
        ),
        (WORLD_DATA, {"weight": 0.0}, "cell_head.weight: must be > 0"),
        (WORLD_DATA, {"layer": 5}, "options.cell_head.layer: 5 is not a hidden state of a 1-layer tower"),
    ],
)
def test_cell_head_refusals(tmp_path, data, cell_head, message):
    with pytest.raises(ConfigError, match=message):
        make_task(tmp_path, data=data, cell_head=cell_head)


def test_cell_head_refuses_a_patch_grid_the_cells_do_not_divide(tmp_path):
    model = {
        "tiny": {
            **TINY_CLIP,
            "vision_config": {**TINY_CLIP["vision_config"], "image_size": 32, "patch_size": 8},
        }
    }
    with pytest.raises(ConfigError, match="4x4 patch grid does not divide into the world's 3x3 cells"):
        make_task(tmp_path, model=model, cell_head={})
