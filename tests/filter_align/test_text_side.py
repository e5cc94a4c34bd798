"""The reward model with a separate text encoder (a sentence-transformers / transformers folder, e.g.
all-MiniLM-L6-v2): pooling equals a naive per-caption pooling and follows the folder's own declaration; the
reward stage learns through the real CLI with the encoder and the CLIP towers frozen; the saved folder
scores a pool (``filter score``) as the trained model scores the same pairs; a hub id that is neither a
folder nor in the offline cache is refused with a clear message."""

import json

import duckdb
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from mmfactory.cli import main
from mmfactory.data.world_source import world_web_pool
from mmfactory.models.hub import resolve_model_folder
from mmfactory.models.image_text_scorer import SentenceEncoder, load_scorer, sentence_pooling, tokenize_texts
from tests.helpers import world_data, write_recipe
from tests.test_image_text_contrastive import TINY_CLIP, clip_stage


def write_sentence_encoder(folder, pooling: str | None = "mean"):
    """A tiny BERT with a WordPiece vocabulary of the world's words, saved as sentence-transformers saves
    a model (``1_Pooling/config.json``; None: a plain transformers folder)."""
    words = {w.strip(".,").lower() for p in world_web_pool(200, 0.5) for w in p["text"].split()}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(w for w in words if w)]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        flags = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens"}
        modes = {f"pooling_mode_{flag}": mode == pooling for mode, flag in flags.items()}
        (folder / "1_Pooling/config.json").write_text(json.dumps(modes))
    return folder


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_pooling_equals_pooling_each_caption_alone_and_follows_the_folder(tmp_path, pooling):
    folder = write_sentence_encoder(tmp_path / "st", pooling)
    assert sentence_pooling(folder) == pooling
    encoder = BertModel.from_pretrained(folder).eval()
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    side = SentenceEncoder(encoder, tokenizer, pooling)
    texts = ["a red circle", "two small blue squares on a green background", "a star"]
    batch = side.tokenize(texts, 64)
    pooled, _ = side(batch["input_ids"], batch["attention_mask"])
    for i, text in enumerate(texts):
        alone = tokenizer([text], return_tensors="pt")
        tokens = encoder(**alone).last_hidden_state[0]
        expected = {"mean": tokens.mean(0), "cls": tokens[0], "max": tokens.max(0).values}[pooling]
        torch.testing.assert_close(pooled[i], expected, atol=1e-5, rtol=1e-5)
    assert sentence_pooling(write_sentence_encoder(tmp_path / "plain", None)) == "mean"


def test_a_reward_model_on_a_sentence_encoder_learns_and_its_folder_scores_a_pool(tmp_path):
    text_dir = write_sentence_encoder(tmp_path / "minilm-like")
    recipe = {
        "name": "test/reward-text-side",
        "defaults": {
            "train": {"batch_size": 32, "log_every": 10, "seed": 0},
            "schedule": {"kind": "constant", "warmup_steps": 0},
        },
        "stages": [
            clip_stage(32, 5),
            {
                "name": "reward",
                "task": "image_text_reward",
                "init_from": "clip",
                "model": {
                    "text_encoder": str(text_dir),
                    "fusion": "cross",
                    "head_hidden": 16,
                    "head_heads": 2,
                },
                "data": world_data(["rankings"], 48, 16),
                "trainable": ["model.head.*"],  # the head holds the text side's projection
                "optimizer": {"lr": 1.0e-2},
                "train": {"max_steps": 150},
            },
        ],
    }
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 0
    records = [json.loads(line) for line in (out / "reward/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    final = out / "reward/final"
    encoder_before = load_file(text_dir / "model.safetensors")
    encoder_after = load_file(final / "text_encoder/model.safetensors")
    assert encoder_before.keys() == encoder_after.keys()
    assert all(torch.equal(encoder_before[k], encoder_after[k]) for k in encoder_before)  # frozen
    clip = load_file(out / "clip/final/model.safetensors")
    assert all(torch.equal(v, load_file(final / "model.safetensors")[k]) for k, v in clip.items())
    assert json.loads((final / "reward_head.json").read_text())["text_pooling"] == "mean"
    head = load_file(final / "reward_head.safetensors")
    assert head["text_projection.weight"].shape == (TINY_CLIP["projection_dim"], 24)
    assert head["fusion.out.weight"].abs().sum() > 0  # the output layer started at zero and learned

    scores = tmp_path / "scores"
    assert (
        main(["filter", "score", "--model", str(final), "--pool", "world:24:0.5", "--out", str(scores)]) == 0
    )
    rows = duckdb.sql(f"SELECT uid, score FROM '{scores}/*/*.parquet' ORDER BY uid").fetchall()
    assert len(rows) == 24
    model, tokenizer, processor = load_scorer(final)
    pool = {p["uid"]: p for p in world_web_pool(24, 0.5)}
    uids = [uid for uid, _ in rows[:4]]
    pixels = processor(images=[pool[u]["image"] for u in uids], return_tensors="pt")["pixel_values"]
    tokens = tokenize_texts(model, tokenizer, [pool[u]["text"] for u in uids], model.max_text_length)
    assert tokens["input_ids"][0, 0] == model.text_side.tokenizer.cls_token_id  # the encoder's own tokens
    with torch.no_grad():
        expected = model.score(pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(torch.tensor([s for _, s in rows[:4]], dtype=torch.float32), expected)


def test_a_text_encoder_that_is_neither_a_folder_nor_cached_is_refused(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="could not be fetched or found in the local cache"):
        resolve_model_folder("sentence-transformers/all-MiniLM-L6-v2", "text_encoder")
    with pytest.raises(FileNotFoundError, match="no such folder, and not a hub id"):
        resolve_model_folder(str(tmp_path / "missing model"), "text_encoder")
