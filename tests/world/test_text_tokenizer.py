import pytest

from mmfactory.world import World, chat_samples, world_tokenizer
from mmfactory.world.text import CHAT_KINDS
from mmfactory.world.tokenizer import SPECIAL_TOKENS, train_tokenizer, world_corpus


def test_chat_samples_format_and_determinism():
    samples = chat_samples("train", 40, seed=0)
    assert samples == chat_samples("train", 40, seed=0) != chat_samples("train", 40, seed=1)
    assert samples == World().chat("train", 40)
    assert {s["kind"] for s in samples} == set(CHAT_KINDS)
    for s in samples:
        assert [m["role"] for m in s["messages"]] == ["user", "assistant"]
        assert all(m["content"] for m in s["messages"])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return world_tokenizer(str(cache_dir))


def test_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    for token in SPECIAL_TOKENS:
        ids = tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in ids and len(ids) == 3
    assert 2000 <= len(tokenizer) <= 4000


def test_round_trip_english_chinese_and_chat(tokenizer):
    for sample in chat_samples("val", 20):
        text = tokenizer.apply_chat_template(sample["messages"], tokenize=False)
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    text = "<image>\n灰色背景上 a ✨ note 🎨, unseen: Ωmega"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_is_cached_and_training_is_deterministic(tokenizer, cache_dir):
    [path] = (cache_dir / "tokenizers").iterdir()
    assert path.name.startswith("world-") and (path / "tokenizer.json").exists()
    assert world_tokenizer(str(cache_dir)).get_vocab() == tokenizer.get_vocab()
    corpus = list(world_corpus(50))
    assert train_tokenizer(corpus, 500).to_str() == train_tokenizer(corpus, 500).to_str()


def test_the_world_tokenizer_is_the_one_every_shipped_model_was_trained_with(tmp_path):
    """The cache name is a digest of the corpus: a change to any world text generator the corpus draws
    from changes the tokenizer, and every trained model's vocabulary with it."""
    from mmfactory.world.tokenizer import VOCAB_SIZE, _tokenizer_dir

    assert _tokenizer_dir(tmp_path, VOCAB_SIZE).name == "world-c838dce992daa18d"
