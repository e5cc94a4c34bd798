"""Multimodal chat data: conversations with images, one chat template, labels on assistant replies only.

Every source becomes conversations (``[{"role", "content"}, ...]``) holding one ``<image>`` per image
(LLaVA puts it at the start of the first user turn) plus the images as uint8 ``[H, W, 3]``
(:class:`ImageConversations`, made by the sources of :mod:`mmfactory.data.sources`).
:class:`MultimodalProcessor` renders them with a template of :mod:`mmfactory.data.chat`, expands each
``<image>`` into the ``P`` placeholder tokens that the model fills with its visual tokens, and preprocesses
images (LLaVA-1.5's pad-to-square with the mean colour, then the tower's image processor:
resize, centre-crop, normalise).

A conversation longer than ``max_length`` is right-truncated and counted, unless the cut would fall in or
before an image span: then it is skipped and counted (a partial span can never be filled correctly).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from mmfactory.data.chat import (
    IGNORE_INDEX,
    ChatTemplate,
    TemplateName,
    TokenizedChat,
    chat_template_jinja,
    collate_chats,
    generation_prompt,
    resolve_template,
    tokenize_chat,
)
from mmfactory.data.readers.llava import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from mmfactory.data.samples import concatenated, selected

PROCESSOR_META = "mmfactory_processor.json"  # template and image settings, next to the model


@dataclass
class MultimodalSample(TokenizedChat):
    """A tokenised conversation (placeholders expanded) and its images, uint8 ``[H, W, 3]`` each."""

    images: list[np.ndarray] = field(default_factory=list)


def expand_placeholders(
    ids: list[int], labels: list[int], spans: dict[int, list[int]]
) -> tuple[list[int], list[int]]:
    """Each token of ``spans`` replaced by its span of ids, labelled ``IGNORE_INDEX`` (never learned)."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if token in spans:
            out_ids += spans[token]
            out_labels += [IGNORE_INDEX] * len(spans[token])
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def pad_to_square(image: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """Centre ``[H, W, 3]`` on a square of colour ``fill`` (LLaVA-1.5's ``image_aspect_ratio: pad``)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=image.dtype)
    canvas[:] = np.asarray(fill, dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


@dataclass
class MultimodalProcessor:
    """Text and images of a conversation -> model inputs; also builds generation prompts.

    Args:
        tokenizer: has ``image_token`` as a single token.
        image_processor: the vision tower's (output side = the tower's ``image_size``).
        num_image_tokens: ``P``, placeholder tokens per image (``MultimodalLMConfig.num_image_tokens``).
        template_name: a chat template of :data:`mmfactory.data.chat.TEMPLATES`.
        pad_square: pad non-square images to squares of the mean colour before the image processor.
    """

    tokenizer: PreTrainedTokenizerBase
    image_processor: BaseImageProcessor
    num_image_tokens: int
    template_name: TemplateName = "chatml"
    image_token: str = IMAGE_TOKEN
    pad_square: bool = True

    def __post_init__(self) -> None:
        self.template: ChatTemplate = resolve_template(self.template_name, self.tokenizer)
        ids = self.tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"the tokenizer splits {self.image_token!r} into {ids}; add it as a special token"
            )
        self.image_token_id: int = ids[0]

    # -- images ----------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` images -> ``[N, 3, S, S]`` float32, ``S`` the tower's image size."""
        if not images:
            size = self.image_processor.crop_size or self.image_processor.size
            return torch.zeros((0, 3, size["height"], size["width"]))
        if self.pad_square:
            fill = [round(255 * m) for m in self.image_processor.image_mean]
            images = [pad_to_square(image, fill) for image in images]
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def media_inputs(self, images: Sequence[Sequence[np.ndarray]]) -> dict[str, torch.Tensor]:
        """The model's image input for conversations holding ``images[i]`` each: ``{"pixel_values"}``."""
        return {"pixel_values": self.pixel_values([image for group in images for image in group])}

    # -- text ------------------------------------------------------------------------------------
    def _expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Each placeholder -> ``P`` placeholders, never learned."""
        return expand_placeholders(
            ids, labels, {self.image_token_id: [self.image_token_id] * self.num_image_tokens}
        )

    def tokenize(self, messages: list[dict[str, str]]) -> TokenizedChat:
        """The whole conversation, placeholders expanded, labels on assistant replies (not truncated)."""
        chat = tokenize_chat(messages, self.tokenizer, self.template)
        return TokenizedChat(*self._expand(chat.input_ids, chat.labels), truncated=False)

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation so far plus an open assistant turn, placeholders expanded."""
        ids = generation_prompt(messages, self.tokenizer, self.template)
        return self._expand(ids, ids)[0]

    def fit(self, chat: TokenizedChat, max_length: int) -> TokenizedChat | None:
        """Right-truncate to ``max_length``; None when the cut would fall in or before an image span."""
        if len(chat.input_ids) <= max_length:
            return chat
        if self.image_token_id in chat.input_ids[max_length:]:
            return None
        return TokenizedChat(chat.input_ids[:max_length], chat.labels[:max_length], truncated=True)

    def collate(
        self, samples: list[MultimodalSample], pad_to_multiple_of: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels``, ``attention_mask`` ``[B, T]`` (right-padded) and ``pixel_values``
        ``[N, 3, S, S]``, the batch's images in reading order."""
        batch = collate_chats(samples, self.tokenizer.pad_token_id, pad_to_multiple_of)
        batch["pixel_values"] = self.pixel_values([image for s in samples for image in s.images])
        return batch

    # -- files -----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Tokenizer (with the trained chat template as its ``chat_template``), ``preprocessor_config.json``
        and the template/pad settings."""
        self.tokenizer.chat_template = chat_template_jinja(self.template, self.image_token)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        meta = {
            "template": self.template_name,
            "image_token": self.image_token,
            "pad_square": self.pad_square,
        }
        (Path(folder) / PROCESSOR_META).write_text(json.dumps(meta))

    @classmethod
    def from_pretrained(cls, folder: str | Path, num_image_tokens: int) -> MultimodalProcessor:
        """The processor saved with a model by :meth:`save_pretrained`."""
        meta = json.loads((Path(folder) / PROCESSOR_META).read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        return cls(
            tokenizer,
            image_processor,
            num_image_tokens,
            meta["template"],
            meta["image_token"],
            meta["pad_square"],
        )


# --------------------------------------------------------------------------------------------------
# Sources and the dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageConversations:
    """Conversations and their images: ``messages[i]`` holds ``num_images[i]`` placeholders for the images
    ``images(i)`` returns (decoded on access; the callable is picklable for DataLoader workers)."""

    messages: list[list[dict[str, str]]]
    num_images: list[int]
    images: Callable[[int], list[np.ndarray]]

    def __add__(self, other: ImageConversations) -> ImageConversations:
        return ImageConversations(
            self.messages + other.messages,
            self.num_images + other.num_images,
            partial(concatenated, self.images, other.images, len(self.messages)),
        )

    def __len__(self) -> int:
        return len(self.messages)

    def select(self, indices: Sequence[int]) -> ImageConversations:
        """The conversations at ``indices`` (in that order; repeats allowed)."""
        indices = list(indices)
        return ImageConversations(
            [self.messages[i] for i in indices],
            [self.num_images[i] for i in indices],
            partial(selected, self.images, indices),
        )

    def first(self, n: int) -> ImageConversations:
        return self if n >= len(self.messages) else self.select(range(n))


def fit_conversation(
    processor: MultimodalProcessor,
    messages: list[dict],
    num_images: int,
    max_length: int,
    counts: Counter[str],
    split: str,
    where: str,
) -> TokenizedChat | None:
    """A conversation tokenised (placeholders expanded) and fitted to ``max_length``, or None when it
    cannot train: counted as ``{split}/skipped_image_cut`` (a span would not fit) or
    ``{split}/skipped_no_reply_tokens`` (truncation left nothing to learn); truncations are counted."""
    per_image = processor.num_image_tokens
    chat = processor.tokenize(messages)
    placeholders = chat.input_ids.count(processor.image_token_id)
    if placeholders != per_image * num_images:
        raise ValueError(
            f"{where}: {placeholders // per_image} {processor.image_token} placeholders in the text for "
            f"{num_images} images"
        )
    return counted_fit(processor.fit(chat, max_length), counts, split, "skipped_image_cut")


def counted_fit(
    fitted: TokenizedChat | None, counts: Counter[str], split: str, cut_key: str
) -> TokenizedChat | None:
    """A processor's ``fit`` result that can train, or None counted: ``{split}/{cut_key}`` (the cut fell
    in or before a media span) or ``{split}/skipped_no_reply_tokens``; truncations are counted."""
    if fitted is None:
        counts[f"{split}/{cut_key}"] += 1
        return None
    if not fitted.has_targets:
        counts[f"{split}/skipped_no_reply_tokens"] += 1
        return None
    counts[f"{split}/truncated"] += fitted.truncated
    return fitted


class MultimodalChatDataset(Dataset):
    """Conversations tokenised once (placeholders expanded, fitted to ``max_length``); images per item.

    ``counts`` receives ``{split}/samples``, ``{split}/truncated``, ``{split}/skipped_image_cut`` (a span
    would not fit) and ``{split}/skipped_no_reply_tokens`` (truncation left nothing to learn).
    """

    def __init__(
        self,
        source: ImageConversations,
        processor: MultimodalProcessor,
        max_length: int,
        counts: Counter[str],
        split: str = "train",
    ):
        self.source = source
        self.samples: list[tuple[int, TokenizedChat]] = []
        for index, messages in enumerate(source.messages):
            where = f"{split} conversation {index}"
            fitted = fit_conversation(
                processor, messages, source.num_images[index], max_length, counts, split, where
            )
            if fitted is not None:
                self.samples.append((index, fitted))
        counts[f"{split}/samples"] = len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> MultimodalSample:
        source_index, chat = self.samples[index]
        return MultimodalSample(chat.input_ids, chat.labels, chat.truncated, self.source.images(source_index))
