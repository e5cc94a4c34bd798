"""Readers for the formats of docs/formats.md. Each returns a map-style :class:`RecordDataset` of
sample dicts; see :mod:`mmfactory.data.readers.records` for how bad input is handled."""

from mmfactory.data.readers.articles import read_articles
from mmfactory.data.readers.audio import read_audio_captions, read_audio_qa
from mmfactory.data.readers.chat import read_chat
from mmfactory.data.readers.llava import read_llava
from mmfactory.data.readers.pairs import read_pairs
from mmfactory.data.readers.preference import read_preference
from mmfactory.data.readers.ranking import ranking_to_pairs, read_rankings
from mmfactory.data.readers.records import Record, RecordDataset
from mmfactory.data.readers.video import read_video_captions, read_video_qa
from mmfactory.data.readers.vqa import read_pope, read_vqa
from mmfactory.data.readers.webdataset import read_webdataset

__all__ = [
    "Record",
    "RecordDataset",
    "ranking_to_pairs",
    "read_articles",
    "read_audio_captions",
    "read_audio_qa",
    "read_chat",
    "read_llava",
    "read_pairs",
    "read_pope",
    "read_preference",
    "read_rankings",
    "read_video_captions",
    "read_video_qa",
    "read_vqa",
    "read_webdataset",
]
