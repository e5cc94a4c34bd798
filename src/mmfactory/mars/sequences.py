"""MARS's training sequences: prompt + ``<img>`` + raster image codes + ``</img>``, in a chat template.

Three directions share one layout (``C`` = the caption, ``[img]`` = ``<img>`` + the codes + ``</img>``):

* ``t2i``:     user ``C`` -> assistant ``[img]``                  (learned: ``<img>``, codes, end of turn)
* ``caption``: user ``[img]`` + instruction -> assistant ``C``   (learned: the caption, end of turn)
* ``joint``:   user ``C`` + instruction -> assistant ``[img]`` + ``C``  (text and image in one reply)

Classifier-free guidance drops the caption of a ``t2i`` sequence (an empty user turn); sampling uses the
same empty turn as its unconditional prompt. Code positions hold :data:`CODE_SLOT` until the image's codes
are filled in (:func:`fill_codes`), so sequences can be built before the image is tokenised.

:class:`T2IDataset` draws each training item's caption, direction and guidance drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from mmfactory.data.chat import IGNORE_INDEX, ChatTemplate
from mmfactory.data.image_text import ImageCaptions

CODE_SLOT = -1  # an image-code position waiting for its code
Direction = Literal["t2i", "caption", "joint"]
DIRECTIONS: tuple[Direction, ...] = ("t2i", "caption", "joint")


def language_of(text: str) -> str:
    """``"zh"`` when the text holds a CJK ideograph, else ``"en"``."""
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


@dataclass
class Instructions:
    """The fixed user-turn texts of the ``caption`` and ``joint`` directions, per language (``en`` is the
    fallback for languages not listed)."""

    caption: dict[str, str] = field(
        default_factory=lambda: {"en": "Describe the image.", "zh": "描述这张图片。"}
    )
    joint: dict[str, str] = field(
        default_factory=lambda: {"en": "Draw it, then describe it.", "zh": "画出来，然后描述它。"}
    )

    def get(self, direction: str, lang: str) -> str:
        table = self.caption if direction == "caption" else self.joint
        return table.get(lang, table["en"])


@dataclass
class Sequence:
    ids: list[int]
    labels: list[int]


class SequenceBuilder:
    """Token ids of each direction for a tokenizer, a chat template and an image vocabulary."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        boi: int,
        eoi: int,
        n_codes: int,
        instructions: Instructions | None = None,
    ):
        self.tokenizer, self.template = tokenizer, template
        self.boi, self.eoi, self.n_codes = boi, eoi, n_codes
        self.instructions = instructions or Instructions()

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _image(self) -> list[int]:
        return [self.boi] + [CODE_SLOT] * self.n_codes + [self.eoi]

    def _user(self, before: list[int], text: str) -> list[int]:
        t = self.template
        return self._text(t.turn_header("user")) + before + self._text(text + t.end) + self._text(t.separator)

    def prompt(self, caption: str | None) -> list[int]:
        """The ``t2i`` prompt up to and including ``<img>`` (``None``: the unconditional one)."""
        return self._user([], caption or "") + self._text(self.template.turn_header("assistant")) + [self.boi]

    def caption_prompt(self, lang: str) -> list[int]:
        """The ``caption`` prompt (image codes as slots) up to the open assistant turn."""
        user = self._user(self._image(), self.instructions.get("caption", lang))
        return user + self._text(self.template.turn_header("assistant"))

    def joint_prompt(self, caption: str) -> list[int]:
        """The ``joint`` prompt up to the open assistant turn (the reply starts with ``<img>`` or text)."""
        user = self._user([], f"{caption}\n{self.instructions.get('joint', language_of(caption))}")
        return user + self._text(self.template.turn_header("assistant"))

    def build(self, direction: Direction, caption: str, drop_caption: bool = False) -> Sequence:
        end = self._text(self.template.end)
        head = self._text(self.template.turn_header("assistant"))
        if direction == "t2i":
            user = self._user([], "" if drop_caption else caption)
            reply = self._image() + end
        elif direction == "caption":
            user = self._user(self._image(), self.instructions.get("caption", language_of(caption)))
            reply = self._text(caption) + end
        elif direction == "joint":
            user = self._user([], f"{caption}\n{self.instructions.get('joint', language_of(caption))}")
            reply = self._image() + self._text(caption) + end
        else:
            raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
        prefix = user + head
        learned = [IGNORE_INDEX if t == self.eoi else t for t in reply]  # </img> is forced, never learned
        return Sequence(prefix + reply, [IGNORE_INDEX] * len(prefix) + learned)


def fill_codes(ids: Tensor, codes: Tensor, text_vocab: int) -> Tensor:
    """Put each row's image codes (``[B, n]``, in raster order) into its ``CODE_SLOT`` positions of ``ids``
    ``[B, T]`` (rows without slots are left alone; a row with slots has exactly ``n``)."""
    slots = ids == CODE_SLOT
    rows = slots.any(1)
    if not bool(rows.any()):
        return ids
    per_row = slots.sum(1)
    if bool((per_row[rows] != codes.shape[1]).any()):
        raise ValueError(f"rows hold {per_row.tolist()} code slots; the images have {codes.shape[1]} codes")
    out = ids.clone()
    out[slots] = (codes[rows] + text_vocab).flatten()
    return out


def pad_sequences(sequences: list[Sequence], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``ids``, ``labels`` (IGNORE_INDEX padding) and ``attention_mask``, all ``[B, T]``."""
    length = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.ids)] = 1
    return {"ids": ids, "labels": labels, "attention_mask": mask}


class T2IDataset(Dataset):
    """Item ``i``: image ``i`` with a caption and a direction drawn from torch's RNG (and, for ``t2i``,
    whether the caption is dropped for guidance). Evaluation items take the first caption, direction t2i."""

    def __init__(self, source: ImageCaptions, train: bool, directions: dict[str, float], cfg_dropout: float):
        self.source, self.train, self.cfg_dropout = source, train, cfg_dropout
        self.names = [d for d in DIRECTIONS if directions.get(d, 0) > 0]
        self.weights = torch.tensor([float(directions[d]) for d in self.names])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        captions = self.source.captions[index]
        if not self.train:
            return {
                "index": index,
                "image": self.source.image(index),
                "caption": captions[0],
                "direction": "t2i",
                "drop": False,
            }
        caption = captions[int(torch.randint(len(captions), ()))]
        direction = self.names[int(torch.multinomial(self.weights, 1))]
        drop = direction == "t2i" and bool(torch.rand(()) < self.cfg_dropout)
        return {
            "index": index,
            "image": self.source.image(index),
            "caption": caption,
            "direction": direction,
            "drop": drop,
        }
