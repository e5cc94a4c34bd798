import pytest

from mmfactory.config import ConfigError
from mmfactory.data.chat import (
    IGNORE_INDEX,
    TEMPLATES,
    chat_template_jinja,
    collate_chats,
    generation_prompt,
    resolve_template,
    template_from_tokenizer,
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


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM"
    ", trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_auto_on_a_chatml_tokenizer_is_the_chatml_renderer(tokenizer):
    assert template_from_tokenizer(tokenizer) == TEMPLATES["chatml"]  # the world tokenizer's own template
    auto = tokenize_chat(MESSAGES, tokenizer, resolve_template("auto", tokenizer))
    chatml = tokenize_chat(MESSAGES, tokenizer, TEMPLATES["chatml"])
    assert (auto.input_ids, auto.labels) == (chatml.input_ids, chatml.labels)


def test_template_auto_keeps_a_default_system_turn_and_learns_only_the_replies():
    hf = world_tokenizer()
    hf.chat_template = SMOLLM2_TEMPLATE
    template = template_from_tokenizer(hf)
    assert template.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    conversation = MESSAGES[1:]  # no system turn: the template's own is added
    chat = tokenize_chat(conversation, hf, template)
    assert hf.decode(chat.input_ids) == hf.apply_chat_template(conversation, tokenize=False)
    learned = [t for t, label in zip(chat.input_ids, chat.labels, strict=True) if label != IGNORE_INDEX]
    assert hf.decode(learned) == "red<|im_end|>blue<|im_end|>"
    prompt = generation_prompt(conversation[:1], hf, template)
    assert hf.decode(prompt) == hf.apply_chat_template(
        conversation[:1], tokenize=False, add_generation_prompt=True
    )
    saved = world_tokenizer()  # what final/ holds: our Jinja of the derived template renders the same
    saved.chat_template = chat_template_jinja(template)
    assert saved.apply_chat_template(conversation, tokenize=False) == hf.apply_chat_template(
        conversation, tokenize=False
    )
    assert template_from_tokenizer(saved) == template


@pytest.mark.parametrize(
    "jinja",
    [
        # the last turn is rendered unlike the others
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if not loop.last %}</s>{% endif %}{% endfor %}",
        # no role in the header
        "{% for m in messages %}>> {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}>> {% endif %}",
    ],
)
def test_template_auto_refuses_a_template_that_is_not_turn_by_turn(jinja):
    hf = world_tokenizer()
    hf.chat_template = jinja
    with pytest.raises(ConfigError, match="template: auto: .* name one of chatml, llama3"):
        template_from_tokenizer(hf)
    hf.chat_template = None
    with pytest.raises(ConfigError, match="has no chat_template"):
        template_from_tokenizer(hf)
