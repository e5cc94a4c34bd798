"""Evaluation metrics in pure Python/numpy. ROUGE-L, BLEU-4 and CIDEr-D equal their reference
implementations (rouge-score, sacrebleu, pycocoevalcap), which are needed only by the tests.

Scales follow the references: ROUGE-L in [0, 1] (rouge-score), BLEU in [0, 100] (sacrebleu),
CIDEr-D as pycocoevalcap (x10); retrieval recalls, accuracies and hallucination rates in percent.
"""

from mmfactory.eval.metrics.bleu import corpus_bleu, tokenize_13a, tokenize_zh
from mmfactory.eval.metrics.cider import cider_d
from mmfactory.eval.metrics.classification import (
    circular_accuracy,
    mme_scores,
    normalize_answer,
    parse_choice,
    parse_yes_no,
    vqa_accuracy,
    yes_no_metrics,
)
from mmfactory.eval.metrics.frechet import frechet_distance
from mmfactory.eval.metrics.hallucination import hallucination_rates, object_hallucination
from mmfactory.eval.metrics.retrieval import retrieval_metrics, retrieval_ranks, text_video_retrieval
from mmfactory.eval.metrics.rouge import lcs_length, rouge_l, tokenize_rouge

__all__ = [
    "cider_d",
    "circular_accuracy",
    "corpus_bleu",
    "frechet_distance",
    "hallucination_rates",
    "lcs_length",
    "mme_scores",
    "normalize_answer",
    "object_hallucination",
    "parse_choice",
    "parse_yes_no",
    "retrieval_metrics",
    "retrieval_ranks",
    "rouge_l",
    "text_video_retrieval",
    "tokenize_13a",
    "tokenize_rouge",
    "tokenize_zh",
    "vqa_accuracy",
    "yes_no_metrics",
]
