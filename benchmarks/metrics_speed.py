"""Speed of mmfactory's text metrics against their references, on the same 10k pairs in one run.

    .venv/bin/python benchmarks/metrics_speed.py                  # 10k pairs, best of 3
    .venv/bin/python benchmarks/metrics_speed.py --pairs 1000 --repeats 1

Compares ROUGE-L (rouge-score ``rougeL``), BLEU-4 with the 13a and zh tokenizers
(``sacrebleu.corpus_bleu``) and CIDEr-D (``pycocoevalcap`` ``Cider``), checks that both sides give
the same score, and prints a markdown table with the time ratio (reference / ours; > 1 = ours faster).
The pairs are synthetic: Zipf-distributed words with punctuation and numbers, each prediction a
perturbed copy of its first reference, 1-3 references per pair.
"""

import argparse
import random
import time
from collections.abc import Callable

import sacrebleu
from pycocoevalcap.cider.cider import Cider
from rouge_score import rouge_scorer

from mmfactory.eval.metrics import cider_d, corpus_bleu, rouge_l, tokenize_13a

WORDS = [f"w{i}" for i in range(3000)] + ["the", "a", "is", "on", "of", "and", "red", "cat", "3.5", "1,000"]
CHINESE_CHARS = [chr(c) for c in range(0x4E00, 0x4E00 + 1500)] + list("，。、！？的了是")


def make_pairs(
    num_pairs: int, vocabulary: list[str], joiner: str, seed: int
) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
    predictions, references = [], []
    for _ in range(num_pairs):
        refs = [rng.choices(vocabulary, weights, k=rng.randint(8, 30)) for _ in range(rng.randint(1, 3))]
        prediction = list(refs[0])
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(len(prediction))
            edit = rng.random()
            if edit < 0.4:
                del prediction[position]
            elif edit < 0.7:
                prediction.insert(position, rng.choices(vocabulary, weights)[0])
            else:
                prediction[position] = rng.choices(vocabulary, weights)[0]
        punctuation = rng.choice(".!?") if joiner else ""
        predictions.append(joiner.join(prediction) + punctuation)
        references.append([joiner.join(ref) + punctuation for ref in refs])
    return predictions, references


def best_time(function: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(best wall time in seconds, the score the function returned)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        score = function()
        times.append(time.perf_counter() - start)
    return min(times), score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    predictions, references = make_pairs(args.pairs, WORDS, " ", seed=0)
    zh_predictions, zh_references = make_pairs(args.pairs, CHINESE_CHARS, "", seed=1)
    tokenized_predictions = [tokenize_13a(p.lower()) for p in predictions]
    tokenized_references = [[tokenize_13a(r.lower()) for r in refs] for refs in references]

    def reference_rouge_l() -> float:
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        pairs = zip(predictions, references, strict=True)
        scores = [scorer.score_multi(refs, prediction)["rougeL"].fmeasure for prediction, refs in pairs]
        return sum(scores) / len(scores)

    def reference_bleu(hyps: list[str], refs: list[list[str]], tokenize: str) -> float:
        width = max(map(len, refs))
        streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
        return sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize).score

    def reference_cider() -> float:
        gts = dict(enumerate(tokenized_references))
        res = {i: [p] for i, p in enumerate(tokenized_predictions)}
        return float(Cider().compute_score(gts, res)[0])

    cases = [
        ("ROUGE-L (en)", reference_rouge_l, lambda: rouge_l(predictions, references)["f"]),
        (
            "BLEU-4 (13a)",
            lambda: reference_bleu(predictions, references, "13a"),
            lambda: corpus_bleu(predictions, references, tokenize="13a")["bleu"],
        ),
        (
            "BLEU-4 (zh)",
            lambda: reference_bleu(zh_predictions, zh_references, "zh"),
            lambda: corpus_bleu(zh_predictions, zh_references, tokenize="zh")["bleu"],
        ),
        (
            "CIDEr-D",
            reference_cider,
            lambda: cider_d(tokenized_predictions, tokenized_references)["cider_d"],
        ),
    ]
    print(f"{args.pairs} pairs, best of {args.repeats}\n")
    print("| metric | reference (s) | mmfactory (s) | speed-up | score (ref / ours) |")
    print("|---|---:|---:|---:|---|")
    for name, reference, ours in cases:
        reference_seconds, reference_score = best_time(reference, args.repeats)
        our_seconds, our_score = best_time(ours, args.repeats)
        if abs(reference_score - our_score) > 1e-6:
            raise AssertionError(f"{name}: reference {reference_score} != ours {our_score}")
        speed_up = reference_seconds / our_seconds
        print(
            f"| {name} | {reference_seconds:.3f} | {our_seconds:.3f} | {speed_up:.2f}x "
            f"| {reference_score:.6f} / {our_score:.6f} |"
        )


if __name__ == "__main__":
    main()
