"""The built-in procedural multimodal world: deterministic images, videos, audio and text from a seed."""

from mmfactory.world.articles import extract_claims
from mmfactory.world.text import chat_samples
from mmfactory.world.tokenizer import world_tokenizer

__all__ = ["chat_samples", "extract_claims", "world_tokenizer"]
