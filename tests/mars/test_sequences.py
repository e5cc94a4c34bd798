"""MARS's sequence layout: which tokens are learned in each direction, guidance dropout, code filling."""

import pytest
import torch

from mmfactory.data.chat import IGNORE_INDEX, TEMPLATES
from mmfactory.data.world_source import world_tokenizer
from mmfactory.mars.sequences import CODE_SLOT, SequenceBuilder, fill_codes, language_of

N = 4


@pytest.fixture(scope="module")
def builder():
    tokenizer = world_tokenizer()
    v = len(tokenizer)
    return SequenceBuilder(tokenizer, TEMPLATES["chatml"], boi=v + 16, eoi=v + 17, n_codes=N)


def test_t2i_learns_the_image_and_the_end_of_turn_not_the_prompt(builder):
    seq = builder.build("t2i", "A red star.")
    start = seq.ids.index(builder.boi)
    assert seq.ids[start : start + N + 2] == [builder.boi, *[CODE_SLOT] * N, builder.eoi]
    assert all(label == IGNORE_INDEX for label in seq.labels[:start])
    assert seq.labels[start : start + N + 1] == [builder.boi, *[CODE_SLOT] * N]
    assert seq.labels[start + N + 1] == IGNORE_INDEX  # </img> is forced
    assert seq.labels[start + N + 2 :] != [] and IGNORE_INDEX not in seq.labels[start + N + 2 :]
    assert seq.ids[: len(builder.prompt("A red star."))] == builder.prompt("A red star.")


def test_guidance_dropout_leaves_an_empty_user_turn(builder):
    dropped = builder.build("t2i", "A red star.", drop_caption=True)
    assert dropped.ids[: dropped.ids.index(builder.boi) + 1] == builder.prompt(None)
    assert "red" not in builder.tokenizer.decode([t for t in dropped.ids if 0 <= t < builder.boi - 16])


def test_caption_learns_only_the_caption(builder):
    seq = builder.build("caption", "一个红色星形。")
    learned = [t for t in seq.labels if t != IGNORE_INDEX]
    assert CODE_SLOT in seq.ids and CODE_SLOT not in learned
    assert builder.tokenizer.decode(learned).startswith("一个红色星形。")


def test_joint_learns_image_then_text(builder):
    seq = builder.build("joint", "A red star.")
    learned = [t for t in seq.labels if t != IGNORE_INDEX]
    assert learned[0] == builder.boi and learned[1 : N + 1] == [CODE_SLOT] * N
    assert builder.tokenizer.decode(learned[N + 1 :]).startswith("A red star.")


def test_fill_codes_puts_each_rows_codes_in_raster_order():
    ids = torch.tensor([[5, CODE_SLOT, CODE_SLOT, 6], [7, 8, 9, 10]])
    out = fill_codes(ids, torch.tensor([[1, 2], [3, 4]]), text_vocab=100)
    assert out.tolist() == [[5, 101, 102, 6], [7, 8, 9, 10]]
    with pytest.raises(ValueError, match="code slots"):
        fill_codes(ids, torch.tensor([[1, 2, 3], [3, 4, 5]]), text_vocab=100)


def test_language_of():
    assert language_of("A red star.") == "en" and language_of("一个红色星形。") == "zh"
