import pytest

from mmfactory.data.chat import (
    IGNORE_INDEX,
    TEMPLATES,
    chat_template_jinja,
    collate_chats,
    generation_prompt,
    tokenize_chat,
)
from mmfactory.world.tokenizer import world_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the square?"},
    {"role": "assistant", "content": "blue"},
]


def test_labels_cover_exactly_the_assistant_replies(tokenizer):
    chat = tokenize_chat(MESSAGES, tokenizer, TEMPLATES["chatml"])
    text = tokenizer.decode(chat.input_ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nAnd the square?<|im_end|>\n"
        "<|im_start|>assistant\nblue<|im_end|>\n"
    )
    learned = [t for t, label in zip(chat.input_ids, chat.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "red<|im_end|>blue<|im_end|>"
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(chat.input_ids, chat.labels, strict=True))


def test_generation_prompt_is_the_training_prefix(tokenizer):
    chat = tokenize_chat(MESSAGES[:3], tokenizer, TEMPLATES["chatml"])
    prompt = generation_prompt(MESSAGES[:2], tokenizer, TEMPLATES["chatml"])
    assert chat.input_ids[: len(prompt)] == prompt
    assert chat.labels[len(prompt)] != IGNORE_INDEX and chat.labels[len(prompt) - 1] == IGNORE_INDEX


def test_truncation_and_padding(tokenizer):
    full = tokenize_chat(MESSAGES, tokenizer, TEMPLATES["chatml"])
    cut = tokenize_chat(MESSAGES, tokenizer, TEMPLATES["chatml"], max_length=10)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:10] and cut.labels == full.labels[:10]
    batch = collate_chats([cut, full], pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
    width = -(-len(full.input_ids) // 8) * 8
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][0].sum() == 10 and batch["attention_mask"][1].sum() == len(full.input_ids)
    assert (batch["labels"][0, 10:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, 10:] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_the_exported_jinja_template_renders_what_the_model_was_trained_on(tokenizer, name):
    template = TEMPLATES[name]
    hf = world_tokenizer()
    hf.chat_template = chat_template_jinja(template)
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False)
    assert (
        hf.encode(rendered, add_special_tokens=False)
        == tokenize_chat(MESSAGES, tokenizer, template).input_ids
    )
    prompt = hf.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert hf.encode(prompt, add_special_tokens=False) == generation_prompt(MESSAGES[:2], tokenizer, template)
