"""A multimodal model scored on benchmark files in their official formats (docs/evaluating.md).

* ``pope``: POPE's JSONL ``{"question_id", "image", "text", "label": "yes"|"no"}`` -> ``accuracy``,
  ``precision``, ``recall``, ``f1``, ``yes_ratio`` (percent), replies read as POPE's and LLaVA's scripts read
  them (:func:`~mmfactory.eval.metrics.official.pope_reading`).
* ``vqa``: LLaVA's question JSONL ``{"question_id", "image", "text"}``, answered by ``answers`` (human
  answers) or ``answer`` (one string) in the record or in an answers file (VQAv2's annotation JSON, or JSONL
  by ``question_id``) -> ``accuracy``: VQAv2's consensus accuracy for a list, exact match after
  :func:`~mmfactory.eval.metrics.normalize_answer` for one string.
* ``captions``: JSONL ``{"image", "captions": [str, ...]}`` -> ``cider_d`` (x10 scale) and ``bleu4`` (0-100).
* ``mmbench``: MMBench's TSV (columns ``index, question, hint?, A, B, C?, D?, answer, image`` (base64),
  ``category?``) -> ``circular`` and ``vanilla`` accuracy: every question asked once per rotation of its
  options, as LLaVA's ``model_vqa_mmbench.py --all-rounds`` asks it.

Image paths are relative to ``image_root`` (default: the file's folder). A bad record (malformed line,
missing field, missing or corrupt image) is skipped and counted by reason, or under ``strict`` raised as
:class:`~mmfactory.data.policy.BadSampleError` naming the file and line. Replies come from an
:data:`Answer` function, so the scoring can be checked with stub replies.
"""

from __future__ import annotations

import base64
import binascii
import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from mmfactory.data.benchmarks import CHOICE_LETTERS, format_choice
from mmfactory.data.multimodal import MultimodalProcessor
from mmfactory.data.policy import (
    BadReason,
    BadSampleCounter,
    BadSampleError,
    BadSamplePolicy,
    handle_bad_sample,
)
from mmfactory.data.readers.records import (
    Fields,
    RecordDataset,
    collect_records,
    decode_image,
    iter_jsonl,
    media_file,
    read_json_file,
    require,
    require_text,
)
from mmfactory.data.readers.vqa import POPE_LABELS
from mmfactory.eval.metrics import cider_d, circular_accuracy, corpus_bleu, vqa_accuracy, yes_no_metrics
from mmfactory.eval.metrics.official import mmbench_choice, pope_reading, vqa_v2_accuracy
from mmfactory.eval.mllm import caption_tokens, generate_multimodal_replies
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.mllm import MultimodalLM

BENCHMARK_KINDS = ("pope", "vqa", "captions", "mmbench")
MMBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "image")
CHUNK = 64  # questions whose images are decoded at once

Answer = Callable[[list[str], list[np.ndarray], int], list[str]]
"""``(questions, images uint8 [H, W, 3], max_new_tokens) -> replies``, one image per question."""


@dataclass(frozen=True)
class BenchmarkFile:
    """A benchmark file of a ``kind`` in :data:`BENCHMARK_KINDS`; ``answers``: a VQA answers file."""

    kind: str
    path: Path
    answers: Path | None = None


def parse_benchmark(spec: str) -> BenchmarkFile:
    """``KIND=FILE`` (``vqa=QUESTIONS,ANSWERS``: answers in a file of their own) -> a :class:`BenchmarkFile`;
    ValueError says what is wrong."""
    kind, equals, files = spec.partition("=")
    if not equals or kind not in BENCHMARK_KINDS or not files:
        raise ValueError(f"expected KIND=FILE with KIND one of {', '.join(BENCHMARK_KINDS)}, got {spec!r}")
    paths = [Path(path) for path in files.split(",")]
    if len(paths) > (2 if kind == "vqa" else 1):
        raise ValueError(f"{spec!r}: {kind} takes one file (vqa: QUESTIONS or QUESTIONS,ANSWERS)")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{spec!r}: {path} is not a file")
    return BenchmarkFile(kind, paths[0], paths[1] if len(paths) == 2 else None)


@dataclass(frozen=True)
class EvalFileOptions:
    """How files are read (``image_root``, ``limit``: the first N records of each, ``strict``) and asked."""

    image_root: Path | None = None
    limit: int | None = None
    strict: bool = False
    caption_prompt: str = "Describe the image briefly."
    max_new_tokens: int = 16
    caption_max_new_tokens: int = 32


@dataclass
class BenchmarkResult:
    """One file's metrics over its ``n`` scored records, and the records skipped (``skipped.summary()``)."""

    kind: str
    file: Path
    n: int
    metrics: dict[str, float]
    skipped: BadSampleCounter = field(default_factory=BadSampleCounter)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": str(self.file),
            "n": self.n,
            "skipped": self.skipped.summary(),
            "skipped_examples": self.skipped.examples,
            "metrics": self.metrics,
        }


def evaluate_files(
    benchmarks: list[BenchmarkFile], answer: Answer, options: EvalFileOptions = EvalFileOptions()
) -> dict[str, BenchmarkResult]:
    """Each file read, asked and scored: ``{name: result}``, named by file stem (``-2``, ``-3`` on repeats).
    A file whose records were all skipped has no metrics."""
    results: dict[str, BenchmarkResult] = {}
    for bench in benchmarks:
        name, copy = bench.path.stem, 1
        while name in results:
            copy += 1
            name = f"{bench.path.stem}-{copy}"
        counter = BadSampleCounter()
        data = read_benchmark(bench, options, counter)
        metrics = SCORERS[bench.kind](data, answer, options) if len(data) else {}
        results[name] = BenchmarkResult(bench.kind, bench.path, len(data), metrics, counter)
    return results


def format_results(results: dict[str, BenchmarkResult]) -> str:
    """A table, one row per metric, then a line per file that had records skipped."""
    lines = [f"{'benchmark':<28} {'kind':<9} {'n':>6} {'skipped':>7}  {'metric':<10} {'value':>8}"]
    for name, result in results.items():
        start = f"{name:<28} {result.kind:<9} {result.n:>6} {result.skipped.total:>7}"
        lines += [f"{start}  {key:<10} {value:>8.2f}" for key, value in result.metrics.items()]
        if not result.metrics:
            lines.append(f"{start}  (no records to score)")
    lines += [f"{name}: {r.skipped.report(examples=3)}" for name, r in results.items() if r.skipped.total]
    return "\n".join(lines)


def model_answerer(model: MultimodalLM, processor: MultimodalProcessor, cfg: GenerationConfig) -> Answer:
    """A model's replies, each question asked as ``<image>\\n{question}`` in one user turn (as LLaVA's eval
    scripts and the world benchmarks ask it), generated with ``cfg`` but the given ``max_new_tokens``."""

    def answer(questions: list[str], images: list[np.ndarray], max_new_tokens: int) -> list[str]:
        conversations = [[{"role": "user", "content": f"{processor.image_token}\n{q}"}] for q in questions]
        generation = replace(cfg, max_new_tokens=max_new_tokens)
        return generate_multimodal_replies(
            model, processor, conversations, [[image] for image in images], generation
        )

    return answer


# -- reading ---------------------------------------------------------------------------------------------


def read_benchmark(
    bench: BenchmarkFile, options: EvalFileOptions, counter: BadSampleCounter
) -> RecordDataset:
    """The file's good records (their images checked to decode); bad ones raised or counted in ``counter``."""
    policy: BadSamplePolicy = "error" if options.strict else "skip"
    if bench.kind == "mmbench":
        items: Iterable[tuple[str, Any]] = _mmbench_rows(bench.path, options.limit, policy, counter)
        parse: Callable[[dict[str, Any]], Fields] = _parse_mmbench
    else:
        items = islice(iter_jsonl(bench.path, policy, counter), options.limit)
        base_dir = options.image_root or bench.path.parent
        if bench.kind == "vqa":
            answers = read_vqa_answers(bench.answers, policy, counter) if bench.answers else {}
            parse = partial(_parse_vqa, base_dir=base_dir, answers=answers)
        else:
            parse = partial(_PARSERS[bench.kind], base_dir=base_dir)
    records = collect_records(bench.path, _with_question_id(items), parse, decode_image, policy, counter)
    return RecordDataset(records, decode_image, counter)


def _with_question_id(items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    for label, raw in items:
        known = isinstance(raw, dict) and "question_id" in raw
        yield (f"{label} (question_id {raw['question_id']!r})" if known else label), raw


def _question(raw: dict[str, Any], base_dir: Path) -> Fields:
    require(raw, "question_id", (str, int))
    return {"image": media_file(base_dir, raw.get("image"), "image"), "question": require_text(raw, "text")}


def _parse_pope(raw: dict[str, Any], base_dir: Path) -> Fields:
    label = require(raw, "label", str)
    if label not in POPE_LABELS:
        raise BadSampleError(f"'label' must be 'yes' or 'no', got {label!r}", reason=BadReason.INVALID_RECORD)
    return {**_question(raw, base_dir), "label": label}


def _parse_captions(raw: dict[str, Any], base_dir: Path) -> Fields:
    captions = require(raw, "captions", list)
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise BadSampleError("'captions' must be a non-empty list of texts", reason=BadReason.INVALID_RECORD)
    return {"image": media_file(base_dir, raw.get("image"), "image"), "captions": captions}


def _parse_vqa(raw: dict[str, Any], base_dir: Path, answers: dict[str, list[str] | str]) -> Fields:
    fields = _question(raw, base_dir)
    if "answers" in raw or "answer" in raw:
        return {**fields, "answers": _human_answers(raw)}
    key = str(raw["question_id"])
    if key not in answers:
        raise BadSampleError(f"no answers for question_id {key}", reason=BadReason.INVALID_RECORD)
    return {**fields, "answers": answers[key]}


def _human_answers(raw: dict[str, Any]) -> list[str] | str:
    """``answers`` (strings, or VQAv2's ``{"answer", ...}`` dicts; at least 2) or else one ``answer``."""
    if "answers" not in raw:
        return require_text(raw, "answer")
    texts = [a.get("answer") if isinstance(a, dict) else a for a in require(raw, "answers", list)]
    if len(texts) < 2 or not all(isinstance(text, str) for text in texts):
        problem = "'answers' must list at least 2 human answers (texts or {'answer': text}); one is 'answer'"
        raise BadSampleError(problem, reason=BadReason.INVALID_RECORD)
    return texts


def read_vqa_answers(
    path: Path, on_bad_sample: BadSamplePolicy, counter: BadSampleCounter
) -> dict[str, list[str] | str]:
    """``str(question_id)`` -> its answers, from VQAv2's annotation JSON (``{"annotations": [{"question_id",
    "answers": [{"answer", ...}, ...]}, ...]}``, or a JSON list of such records) or a JSONL file of them."""
    if path.suffix == ".jsonl":
        items: Iterable[tuple[str, Any]] = iter_jsonl(path, on_bad_sample, counter)
    else:
        data = read_json_file(path)
        annotations = data.get("annotations") if isinstance(data, dict) else data
        if not isinstance(annotations, list):
            problem = "expected VQAv2's {'annotations': [...]} or a JSON list of answer records"
            raise BadSampleError(problem, reason=BadReason.INVALID_RECORD, file=path)
        items = ((f"annotations[{i}]", record) for i, record in enumerate(annotations))

    def parse(raw: dict[str, Any]) -> Fields:
        return {"key": str(require(raw, "question_id", (str, int))), "answers": _human_answers(raw)}

    records = collect_records(path, _with_question_id(items), parse, None, on_bad_sample, counter)
    return {record.fields["key"]: record.fields["answers"] for record in records}


def _mmbench_rows(
    path: Path, limit: int | None, on_bad_sample: BadSamplePolicy, counter: BadSampleCounter
) -> list[tuple[str, dict[str, str]]]:
    """``("line N (index I)", {column: value})`` for the first ``limit`` rows of an MMBench TSV; a row that
    does not parse or has the wrong number of cells goes to the policy. Cells may be quoted and span lines
    (pandas ``to_csv(sep="\\t")``), so rows are read with ``csv`` and numbered by their first line."""
    previous = csv.field_size_limit(2**31 - 1)  # one cell holds a whole base64 image
    rows: list[tuple[str, dict[str, str]]] = []
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file, delimiter="\t")
            header = next(reader, [])
            if missing := [column for column in MMBENCH_COLUMNS if column not in header]:
                problem = (
                    f"header lacks columns {missing} (MMBench's test split has no answers: scored online)"
                )
                raise BadSampleError(problem, reason=BadReason.MALFORMED_CSV, file=path, record="line 1")
            while limit is None or len(rows) < limit:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:
                    problem = f"malformed TSV row: {error}"
                else:
                    if not row:  # a blank line
                        continue
                    problem = (
                        None if len(row) == len(header) else f"{len(row)} cells for {len(header)} columns"
                    )
                if problem is not None:
                    bad = BadSampleError(problem, reason=BadReason.MALFORMED_CSV)
                    handle_bad_sample(bad.located(path, f"line {start}"), on_bad_sample, counter)
                    continue
                cells = dict(zip(header, row, strict=True))
                rows.append((f"line {start} (index {cells['index']})", cells))
    except UnicodeDecodeError as error:
        raise BadSampleError(f"not UTF-8: {error}", reason=BadReason.MALFORMED_CSV, file=path) from error
    finally:
        csv.field_size_limit(previous)
    return rows


def _missing(cell: str | None) -> bool:
    """An empty cell as pandas writes NaN, or ``nan`` / ``none`` as LLaVA's ``is_none`` reads them."""
    return cell is None or cell.strip().lower() in ("", "nan", "none")


def _parse_mmbench(raw: dict[str, str]) -> Fields:
    """The options are ``A``, ``B``, ... up to the first missing one; a hint goes before the question."""
    options = []
    for letter in CHOICE_LETTERS:
        if _missing(raw.get(letter)):
            break
        options.append(raw[letter])
    if len(options) < 2:
        raise BadSampleError("needs options A and B", reason=BadReason.INVALID_RECORD)
    letters = CHOICE_LETTERS[: len(options)]
    if (answer := raw["answer"].strip()) not in letters:
        raise BadSampleError(
            f"'answer' must be one of {letters}, got {answer!r}", reason=BadReason.INVALID_RECORD
        )
    question = require_text(raw, "question")
    if not _missing(raw.get("hint")):
        question = f"{raw['hint']}\n{question}"
    try:
        image = base64.b64decode(raw["image"], validate=True)
    except binascii.Error as error:
        raise BadSampleError(f"'image' is not base64: {error}", reason=BadReason.CORRUPT_IMAGE) from error
    return {"image": image, "question": question, "options": options, "answer": letters.index(answer)}


_PARSERS = {"pope": _parse_pope, "captions": _parse_captions}


# -- scoring ---------------------------------------------------------------------------------------------


def _replies(
    answer: Answer, data: RecordDataset, asks: list[tuple[int, str]], max_new_tokens: int
) -> list[str]:
    """The replies to ``(record index, question)`` asks, their images decoded :data:`CHUNK` at a time."""
    replies: list[str] = []
    for lo in range(0, len(asks), CHUNK):
        part = asks[lo : lo + CHUNK]
        replies += answer([q for _, q in part], [data[i]["image"] for i, _ in part], max_new_tokens)
    return replies


def _fields(data: RecordDataset) -> list[Fields]:
    return [record.fields for record in data.records]


def score_pope(data: RecordDataset, answer: Answer, options: EvalFileOptions) -> dict[str, float]:
    probes = _fields(data)
    asks = [(i, p["question"]) for i, p in enumerate(probes)]
    readings = [pope_reading(r) for r in _replies(answer, data, asks, options.max_new_tokens)]
    result = yes_no_metrics(readings, [p["label"] for p in probes])
    return {key: result[key] for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")}


def score_vqa(data: RecordDataset, answer: Answer, options: EvalFileOptions) -> dict[str, float]:
    questions = _fields(data)
    asks = [(i, q["question"]) for i, q in enumerate(questions)]
    replies = _replies(answer, data, asks, options.max_new_tokens)
    scores = [
        vqa_v2_accuracy(reply, q["answers"])
        if isinstance(q["answers"], list)
        else vqa_accuracy([reply], [q["answers"]])["accuracy"]
        for reply, q in zip(replies, questions, strict=True)
    ]
    return {"accuracy": sum(scores) / len(scores)}


def score_captions(data: RecordDataset, answer: Answer, options: EvalFileOptions) -> dict[str, float]:
    """As :func:`~mmfactory.eval.mllm.evaluate_captions` scores the world's captions."""
    references = [s["captions"] for s in _fields(data)]
    asks = [(i, options.caption_prompt) for i in range(len(references))]
    replies = _replies(answer, data, asks, options.caption_max_new_tokens)
    cider = cider_d(
        [caption_tokens(r) for r in replies], [[caption_tokens(t) for t in refs] for refs in references]
    )
    return {"cider_d": cider["cider_d"], "bleu4": corpus_bleu(replies, references)["bleu"]}


def score_mmbench(data: RecordDataset, answer: Answer, options: EvalFileOptions) -> dict[str, float]:
    """Each question asked once per rotation of its options (:func:`~mmfactory.eval.mllm.format_choice`),
    the reply's letter read by :func:`~mmfactory.eval.metrics.official.mmbench_choice`."""
    questions = _fields(data)
    asked = [(i, shift) for i, q in enumerate(questions) for shift in range(len(q["options"]))]
    prompts = [format_choice(questions[i], shift) for i, shift in asked]
    asks = [(i, prompt) for (i, _), (prompt, _) in zip(asked, prompts, strict=True)]
    replies = _replies(answer, data, asks, options.max_new_tokens)
    correct = []
    for reply, (i, shift), (_, right) in zip(replies, asked, prompts, strict=True):
        options_of = questions[i]["options"]
        shown = options_of[shift:] + options_of[:shift]  # as format_choice shows them
        correct.append(mmbench_choice(reply, shown) == right)
    return circular_accuracy(correct, [i for i, _ in asked])


SCORERS: dict[str, Callable[[RecordDataset, Answer, EvalFileOptions], dict[str, float]]] = {
    "pope": score_pope,
    "vqa": score_vqa,
    "captions": score_captions,
    "mmbench": score_mmbench,
}
