"""Multimodal data (labels, placeholder expansion, truncation, collation, LLaVA files), the mllm_sft task
with LoRA (merged before saving), and the generation benchmarks' plumbing."""

import json
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessorPil

import mmfactory.eval.mllm as eval_mllm
from mmfactory.config import OptimizerConfig, StageConfig, from_dict
from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.data.multimodal import (
    ImageConversations,
    MultimodalChatDataset,
    MultimodalProcessor,
    pad_to_square,
)
from mmfactory.data.source_config import SourceConfig
from mmfactory.data.sources import read_sources
from mmfactory.data.world_source import world_benchmarks, world_conversations
from mmfactory.eval.mllm import caption_tokens, evaluate_mllm
from mmfactory.losses.lm import causal_lm_loss
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.mllm import MultimodalLM
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.train.optim import build_optimizer, select_trainable
from mmfactory.world import World, world_tokenizer
from tests.helpers import TINY_LM, world_data
from tests.models.test_mllm import TINY_VISION, tiny_mllm

P = 4  # placeholder tokens per image of the tiny tower


def processor(**kwargs) -> MultimodalProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return MultimodalProcessor(world_tokenizer(), image_processor, P, **kwargs)


def ask(question: str, answer: str, image: bool = True) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": ("<image>\n" if image else "") + question},
        {"role": "assistant", "content": answer},
    ]


def constant_images(*values: int) -> list[np.ndarray]:
    """One 16x16 flat image per value (value = its grey level)."""
    return [np.full((16, 16, 3), v, dtype=np.uint8) for v in values]


def images_of(*groups: tuple[int, ...]) -> Callable[[int], list[np.ndarray]]:
    """``ImageConversations.images`` for conversations holding the flat images of each group."""
    return [constant_images(*group) for group in groups].__getitem__


# -- processor and data ----------------------------------------------------------------------------


def test_placeholders_expand_and_only_assistant_replies_are_labelled():
    proc = processor()
    tokenizer = proc.tokenizer
    messages = ask("What color is the star?", "red") + [
        {"role": "user", "content": "How many circles are there?"},
        {"role": "assistant", "content": "2"},
    ]
    chat = proc.tokenize(messages)
    image_positions = [i for i, t in enumerate(chat.input_ids) if t == proc.image_token_id]
    assert image_positions == list(range(image_positions[0], image_positions[0] + P))  # one contiguous span
    assert all(chat.labels[i] == IGNORE_INDEX for i in image_positions)

    # Naive reference: the rendered text tokenised in one go, with <image> repeated P times.
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert chat.input_ids == tokenizer.encode(
        rendered.replace("<image>", "<image>" * P), add_special_tokens=False
    )
    learned = [t for t, label in zip(chat.input_ids, chat.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "red<|im_end|>2<|im_end|>"
    assert [label for label in chat.labels if label != IGNORE_INDEX] == learned

    prompt = proc.prompt(messages[:1])
    assert (
        tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
        and prompt.count(proc.image_token_id) == P
    )


def test_truncation_never_cuts_an_image_span_and_everything_is_counted():
    proc = processor()
    long_reply = " ".join(["red circle"] * 30)
    second_image_late = ask("What color?", "red") + [
        {"role": "user", "content": " ".join(["Is there a star?"] * 10) + "<image>\nAnd here?"},
        {"role": "assistant", "content": "no"},
    ]
    source = ImageConversations(
        messages=[
            ask("What color?", "red"),
            ask("Describe it.", long_reply),
            second_image_late,
            ask(" ".join(["Where is the star?"] * 20), "top"),
        ],
        num_images=[1, 1, 2, 1],
        images=images_of((10,), (20,), (30, 35), (40,)),
    )
    counts: Counter[str] = Counter()
    dataset = MultimodalChatDataset(source, proc, max_length=48, counts=counts)
    assert counts == {
        "train/samples": 2,
        "train/truncated": 1,
        "train/skipped_image_cut": 1,
        "train/skipped_no_reply_tokens": 1,
    }
    assert len(dataset[0].input_ids) < 48 and len(dataset[1].input_ids) == 48
    assert dataset[1].truncated and dataset[1].input_ids.count(proc.image_token_id) == P
    assert dataset[1].images[0][0, 0, 0] == 20  # images follow their conversation


def test_a_placeholder_the_tokenizer_splits_or_a_missing_image_is_refused():
    with pytest.raises(ValueError, match="splits '<imagery>'"):
        processor(image_token="<imagery>")
    source = ImageConversations([ask("What?", "red", image=False)], [1], images_of((0,)))
    with pytest.raises(ValueError, match="conversation 0: 0 <image> placeholders in the text for 1 images"):
        MultimodalChatDataset(source, processor(), 64, Counter())


def test_collate_keeps_images_in_reading_order_and_pads():
    proc = processor()
    source = ImageConversations(
        messages=[ask("A?", "red"), ask("B?", "a longer reply here", image=False), ask("<image>\nC?", "no")],
        num_images=[1, 0, 2],
        images=images_of((50,), (), (100, 150)),
    )
    dataset = MultimodalChatDataset(source, proc, 64, Counter())
    batch = proc.collate([dataset[i] for i in range(3)], pad_to_multiple_of=8)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(dataset[i].input_ids) for i in range(3))
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    torch.testing.assert_close(batch["pixel_values"], proc.pixel_values(constant_images(50, 100, 150)))
    lengths = batch["attention_mask"].sum(1).tolist()
    for i, length in enumerate(lengths):
        assert (batch["input_ids"][i, length:] == proc.tokenizer.pad_token_id).all()
        assert (batch["labels"][i, length:] == IGNORE_INDEX).all()


def test_pad_to_square_centres_on_the_fill_colour():
    image = np.full((2, 4, 3), 200, dtype=np.uint8)
    square = pad_to_square(image, (1, 2, 3))
    assert square.shape == (4, 4, 3)
    assert (square[1:3] == 200).all() and (square[0] == [1, 2, 3]).all() and (square[3] == [1, 2, 3]).all()
    assert pad_to_square(square, (0, 0, 0)) is square


def test_world_kinds_share_one_format():
    for kind in ("captions", "vqa", "existence_pairs", "llava", "pope"):
        source = world_conversations(kind, "val", 3)
        assert len(source.messages) == 3 and source.num_images == [1, 1, 1]
        assert source.messages[0][0]["content"].startswith("<image>\n")
        assert source.images(2)[0].shape == (32, 32, 3)
    both = world_conversations("captions", "val", 2) + world_conversations("vqa", "val", 2)
    assert len(both.messages) == 4 and both.images(3)[0].shape == (32, 32, 3)


def test_world_pope_probes_are_balanced_and_mix_negative_kinds():
    source = world_conversations("pope", "val", 12)
    answers = [m[1]["content"] for m in source.messages]
    assert answers.count("yes") == answers.count("no") == 6
    questions = [m[0]["content"] for m in source.messages]
    assert all(q.startswith("<image>\nIs there ") for q in questions)
    world = World(seed=0)
    expected = [
        world.pope("val", 4, kind)[i]["question"]
        for i in range(4)
        for kind in ("random", "popular", "adversarial")
    ]
    assert questions == ["<image>\n" + q for q in expected]


def test_llava_json_files_are_read_and_bad_records_counted(tmp_path: Path):
    for name, grey in (("a.png", 30), ("b.png", 90)):
        Image.fromarray(np.full((20, 12, 3), grey, dtype=np.uint8)).save(tmp_path / name)
    records = [
        {
            "id": "1",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "2",
            "image": "b.png",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "no"}],
        },
        {
            "id": "3",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "b"}],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    counts = Counter()
    llava = SourceConfig(
        "llava", path=str(tmp_path / "llava.json"), on_bad_sample="skip", missing_image_token="error"
    )
    source = read_sources([llava], "image-chat", counts, "train", report=False)
    assert counts == {"train/bad_missing_file": 1, "train/bad_placeholder_mismatch": 1}
    dataset = MultimodalChatDataset(source, processor(), 64, Counter())
    sample = dataset[0]
    assert len(dataset) == 1 and sample.images[0].shape == (20, 12, 3)
    pixels = processor().pixel_values(sample.images)  # 20x12 padded with the mean colour to 20x20, resized
    assert pixels.shape == (1, 3, 16, 16)
    assert pixels[0, :, 8, 0].abs().max() < 0.02 and (pixels[0, :, 8, 8] < -1).all()  # pad ~ 0, grey 30 dark


# -- the task ----------------------------------------------------------------------------------------


def tiny_stage(**overrides) -> StageConfig:
    raw = {
        "name": "instruct",
        "task": "mllm_sft",
        "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": dict(TINY_LM)}},
        "data": world_data(["vqa"], 8, 4, image_size=16),
        "options": {"eval": {"vqa": 2, "pope": 2, "captions": 2, "max_new_tokens": 3}},
        **overrides,
    }
    return from_dict(StageConfig, raw, "stage")


def test_loss_on_kept_logits_equals_the_full_causal_lm_loss_in_value_and_gradient(tmp_path):
    torch.manual_seed(0)
    task = build_task(tiny_stage(), 0, StageContext(tmp_path, tmp_path / "s"))
    batch = task.collate([task.train_dataset()[i] for i in (0, 5, 7)])
    params = [p for p in task.parameters() if p.requires_grad]
    grad = partial(torch.autograd.grad, inputs=params, allow_unused=True)  # the tower's last layer is unused
    loss = task(batch)["loss"]
    logits = task.model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
    reference, count = causal_lm_loss(logits, batch["labels"])  # every position projected to the vocabulary
    assert count == task.loss_weight(batch) > 0
    torch.testing.assert_close(loss, reference)
    for got, want in zip(grad(loss), grad(reference), strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)

    batch["labels"][:] = IGNORE_INDEX  # nothing to learn: a zero loss with zero gradients, never NaN
    loss = task(batch)["loss"]
    assert loss.item() == 0.0
    assert all(g is None or not g.any() for g in grad(loss))


def test_sample_reduction_averages_each_samples_mean_token_loss(tmp_path):
    torch.manual_seed(0)
    options = {"eval": {"vqa": 0, "pope": 0, "captions": 0}, "loss_reduction": "sample"}
    data = world_data(["vqa", "llava"], 8, 4, image_size=16)
    task = build_task(tiny_stage(options=options, data=data), 0, StageContext(tmp_path, tmp_path / "s"))
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in (0, 9, 15)])
    batch["labels"][1] = IGNORE_INDEX  # a sample without targets does not count
    loss = task(batch)["loss"]
    logits = task.model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
    per_sample = [causal_lm_loss(logits[b : b + 1], batch["labels"][b : b + 1]) for b in (0, 2)]
    assert per_sample[0][1] != per_sample[1][1]  # different lengths: token and sample means differ
    torch.testing.assert_close(loss, (per_sample[0][0] + per_sample[1][0]) / 2)
    assert task.loss_weight(batch) == 2 and task.loss_unit == "samples"
    token_mean, _ = causal_lm_loss(logits, batch["labels"])
    assert not torch.isclose(loss, token_mean)


def test_lora_trains_only_adapters_and_projector_and_saves_a_merged_plain_model(tmp_path):
    torch.manual_seed(0)
    stage = tiny_stage(
        options={
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
        },
        trainable=["model.projector.*", "*lora_*"],
    )
    task = build_task(stage, 0, StageContext(tmp_path, tmp_path / "instruct"))
    names = select_trainable(task, stage.trainable, stage.frozen)
    assert names and all(n.startswith("model.projector.") or "lora_" in n for n in names)
    assert any("lora_B" in n for n in names)
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    task(batch)["loss"].backward()
    optimizer.step()

    task.eval()
    with torch.no_grad():
        adapted = task.model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
    task.save_pretrained(tmp_path / "final")
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in saved)
    loaded = MultimodalLM.from_pretrained(tmp_path / "final")
    with torch.no_grad():
        merged = loaded(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "final" / "preprocessor_config.json").is_file()


def test_task_refuses_model_parts_together_with_init_from(tmp_path):
    model, tokenizer, image_processor = tiny_mllm()
    model.save_pretrained(tmp_path / "prev")
    stage = tiny_stage(init_from=str(tmp_path / "prev"))
    with pytest.raises(ValueError, match="init_from provides the whole model"):
        build_task(stage, 0, StageContext(tmp_path, tmp_path / "s"))


# -- evaluation --------------------------------------------------------------------------------------


def test_benchmarks_score_perfect_answers_perfectly(monkeypatch):
    bench = world_benchmarks(vqa=10, pope=4, captions=3, split="test")
    truths = {id(s["image"]): s for s in bench.vqa + [p for ps in bench.pope.values() for p in ps]}
    captions = {id(s["image"]): s["references"][0] for s in bench.captions}

    def oracle(model, processor, conversations, images, cfg, meter=None):
        replies = []
        for (image,) in images:
            sample = truths.get(id(image))
            replies.append(
                captions[id(image)] if sample is None else sample.get("answer", sample.get("label"))
            )
        return replies

    monkeypatch.setattr(eval_mllm, "generate_multimodal_replies", oracle)
    model, _, _ = tiny_mllm()
    metrics = evaluate_mllm(model, None, bench, GenerationConfig())
    assert metrics["vqa_accuracy"] == 100.0
    assert {f"vqa_accuracy_{s['type']}" for s in bench.vqa} <= metrics.keys()
    for split in ("random", "popular", "adversarial"):
        assert metrics[f"pope_{split}_f1"] == 100.0 and metrics[f"pope_{split}_yes_ratio"] == 50.0
    assert metrics["caption_bleu4"] == pytest.approx(100.0)
    assert "gen_tokens_per_s" not in metrics  # nothing was generated


def test_evaluation_generates_with_a_real_model_and_measures_it():
    model, tokenizer, image_processor = tiny_mllm()
    proc = MultimodalProcessor(tokenizer, image_processor, model.config.num_image_tokens)
    bench = world_benchmarks(vqa=3, pope=2, captions=2, split="test", image_size=16)
    metrics = evaluate_mllm(model, proc, bench, GenerationConfig(max_new_tokens=3, batch_size=2), 4)
    assert 0.0 <= metrics["vqa_accuracy"] <= 100.0 and metrics["gen_tokens_per_s"] > 0
    assert metrics["peak_memory_mb"] > 0 and "pope_adversarial_accuracy" in metrics
    assert model.training  # restored


def test_caption_tokens_drop_punctuation_and_case():
    assert caption_tokens("A red Circle, and a star.") == "a red circle and a star"


def test_vision_lr_scale_applies_to_the_tower_only(tmp_path):
    stage = tiny_stage(options={"vision_lr_scale": 0.1}, trainable=["*"])
    task = build_task(stage, 0, StageContext(tmp_path, tmp_path / "s"))
    select_trainable(task, stage.trainable, stage.frozen)
    optimizer = build_optimizer(task, OptimizerConfig(lr=1e-3))
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in task.named_parameters():
        expected = 1e-4 if name.startswith("model.vision_tower.") else 1e-3
        assert lr_of[id(param)] == pytest.approx(expected), name


def test_a_streamed_image_chat_source_gives_the_samples_read_up_front(tmp_path):
    """The same parquet rows streamed or read up front become the same tokenised samples and images."""
    import io as _io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from mmfactory.data.streaming import StreamBatches, TrainStream

    def png(value):
        out = _io.BytesIO()
        Image.new("RGB", (16, 16), (value, 0, 0)).save(out, format="PNG")
        return {"bytes": out.getvalue(), "path": None}

    rows = [ask(f"What is {i}?", f"{i}") for i in range(6)]
    table = pa.table({"messages": rows, "images": [[png(10 * i)] for i in range(6)]})
    pq.write_table(table, tmp_path / "chats.parquet")
    source = {"format": "hf", "path": str(tmp_path / "chats.parquet")}
    up_front = build_task(
        tiny_stage(data={"train": [source], "eval": []}), 0, StageContext(tmp_path, tmp_path / "a")
    )
    streamed = build_task(
        tiny_stage(data={"train": [{**source, "streaming": True, "shuffle_buffer": 0}], "eval": []}),
        0,
        StageContext(tmp_path, tmp_path / "b"),
    )
    stream = streamed.train_dataset()
    assert isinstance(stream, TrainStream)
    batch = next(iter(StreamBatches(stream.stream, stream.item, 6, 1, 0, 1, 0)))
    expected = [up_front.train_dataset()[i] for i in range(6)]
    for got, want in zip(batch, expected, strict=True):
        assert got.input_ids == want.input_ids and got.labels == want.labels
        np.testing.assert_array_equal(got.images[0], want.images[0])
    assert torch.isfinite(streamed(streamed.collate(batch))["loss"])
