"""Benchmark files in their official formats (POPE, VQA, captions, MMBench TSV) scored with stub replies equal
hand computations; bad records are skipped and counted by reason, or refused with file and line; the CLI
scores a real tiny model's replies to a POPE file."""

import base64
import csv
import io
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfactory.data.multimodal import MultimodalProcessor
from mmfactory.data.policy import BadSampleError
from mmfactory.eval.external import BenchmarkFile, EvalFileOptions, evaluate_files, parse_benchmark
from mmfactory.eval.metrics import cider_d, corpus_bleu, normalize_answer
from mmfactory.eval.metrics.official import mmbench_choice, pope_reading, vqa_v2_accuracy
from mmfactory.eval.mllm import caption_tokens, generate_multimodal_replies, load_mllm
from mmfactory.models.generation import GenerationConfig
from tests.models.test_mllm import tiny_mllm


def png_bytes(red: int) -> bytes:
    """An 8x8 PNG whose red channel is ``red`` everywhere: the stub tells images apart by it."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (red, 0, 0), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(folder: Path, name: str, red: int) -> str:
    (folder / name).write_bytes(png_bytes(red))
    return name


def write_jsonl(path: Path, rows: list) -> Path:
    """Dicts as JSON lines; a string is written as it is (a malformed line)."""
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


class Stub:
    """Replies looked up by ``(question, image red value)``, so a question paired with the wrong image fails;
    records what it was asked."""

    def __init__(self, replies: dict[tuple[str, int], str]):
        self.replies, self.asked, self.max_new_tokens = replies, [], set()

    def __call__(self, questions: list[str], images: list[np.ndarray], max_new_tokens: int) -> list[str]:
        keys = [(q, int(image[0, 0, 0])) for q, image in zip(questions, images, strict=True)]
        self.asked += keys
        self.max_new_tokens.add(max_new_tokens)
        return [self.replies[key] for key in keys]


def evaluate_one(kind: str, path: Path, stub: Stub, answers: Path | None = None, **options):
    return evaluate_files([BenchmarkFile(kind, path, answers)], stub, EvalFileOptions(**options))[path.stem]


# -- POPE ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "reading"),
    [
        ("Yes, there is a cat.", "yes"),
        ("No.", "no"),
        ("There is not a car in the image.", "no"),
        ("I think so", "yes"),  # neither word: yes, as POPE's and LLaVA's scripts read it
        ("Yes. No, wait.", "yes"),  # only the first sentence counts
        ("No, there isn't", "no"),  # the comma is dropped before splitting
        ("NO", "yes"),  # their match is case-sensitive
    ],
)
def test_pope_reading_follows_llavas_eval_pope(reply, reading):
    assert pope_reading(reply) == reading


def pope_files(tmp_path: Path) -> tuple[Path, dict[tuple[str, int], str]]:
    probes = [
        ("Is there a cat in the image?", 10, "yes", "Yes, there is a cat."),
        ("Is there a dog in the image?", 20, "no", "No."),
        ("Is there a car in the image?", 30, "yes", "There is not a car."),
        ("Is there a bus in the image?", 40, "no", "I think so"),
        ("Is there a tree in the image?", 50, "no", "Yes. No, wait."),
        ("Is there a person in the image?", 10, "yes", "yes"),
    ]
    rows: list = [
        {"question_id": i, "image": write_png(tmp_path, f"{red}.png", red), "text": text, "label": label}
        for i, (text, red, label, _) in enumerate(probes)
    ]
    rows += [
        {"question_id": 90, "image": "gone.png", "text": "Is there a cat?", "label": "yes"},
        '{"question_id": 91, "image": ',
        {"question_id": 92, "image": "10.png", "text": "Is there a cat?"},
        {"question_id": 93, "image": "10.png", "text": "Is there a cat?", "label": "maybe"},
    ]
    return write_jsonl(tmp_path / "coco_pope_random.jsonl", rows), {
        (t, r): reply for t, r, _, reply in probes
    }


def test_pope_file_scores_equal_a_hand_count_and_bad_records_are_counted(tmp_path):
    path, replies = pope_files(tmp_path)
    result = evaluate_one("pope", path, Stub(replies))

    # the replies read by hand (first sentence; "no" / "not" -> no, anything else -> yes) against the labels
    predicted = ["yes", "no", "no", "yes", "yes", "yes"]
    labels = ["yes", "no", "yes", "no", "no", "yes"]
    pairs = list(zip(predicted, labels, strict=True))
    tp, fp = pairs.count(("yes", "yes")), pairs.count(("yes", "no"))
    tn, fn = pairs.count(("no", "no")), pairs.count(("no", "yes"))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    expected = {
        "accuracy": 100 * (tp + tn) / 6,
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * 2 * precision * recall / (precision + recall),
        "yes_ratio": 100 * (tp + fp) / 6,
    }
    assert result.metrics == pytest.approx(expected)
    assert result.n == 6
    assert result.skipped.summary() == {"invalid_record": 2, "malformed_json": 1, "missing_file": 1}
    assert result.to_json()["skipped_examples"]["missing_file"] == [f"{path}, line 7 (question_id 90)"]


def test_limit_names_an_all_bad_file_and_strict_refuses_with_file_and_line(tmp_path):
    path, replies = pope_files(tmp_path)
    stub = Stub(replies)
    all_bad = write_jsonl(tmp_path / "bad" / "coco_pope_random.jsonl", ["{", {"question_id": 1}])
    results = evaluate_files(
        [BenchmarkFile("pope", path), BenchmarkFile("pope", all_bad)], stub, EvalFileOptions(limit=3)
    )
    assert list(results) == ["coco_pope_random", "coco_pope_random-2"]
    assert (results["coco_pope_random"].n, results["coco_pope_random-2"].n) == (3, 0)
    assert results["coco_pope_random-2"].metrics == {}
    assert results["coco_pope_random-2"].skipped.summary() == {"invalid_record": 1, "malformed_json": 1}
    assert [q for q, _ in stub.asked] == [
        "Is there a cat in the image?",
        "Is there a dog in the image?",
        "Is there a car in the image?",
    ]
    with pytest.raises(
        BadSampleError, match=r"coco_pope_random.jsonl, line 7 \(question_id 90\): image file"
    ):
        evaluate_one("pope", path, Stub(replies), strict=True)


# -- VQA -------------------------------------------------------------------------------------------------


def naive_vqa_v2(reply: str, humans: list[str]) -> float:
    """Literally VQAv2's definition: min(#humans that said it / 3, 1), averaged over all 10-choose-9 sets."""
    said = [normalize_answer(h) == normalize_answer(reply) for h in humans]
    subsets = list(combinations(said, len(humans) - 1))
    return 100 * sum(min(sum(subset) / 3, 1) for subset in subsets) / len(subsets)


VQA_HUMANS = {
    1: ["2", "2", "Two", "3", "3", "3", "3", "3", "4", "4"],  # 3 say "2": 9/10
    2: ["red"] + ["orange"] * 9,  # 1 says "red": 3/10
    3: ["blue"] * 5 + ["navy"] * 5,  # 5 say "blue": 1
}


@pytest.mark.parametrize("answers_format", ["vqav2_annotations", "jsonl"])
def test_vqa_file_scores_equal_the_10_choose_9_formula(tmp_path, answers_format):
    questions = [
        (1, "How many dogs are there?", 10, "two"),
        (2, "What color is the car?", 20, "Red."),
        (3, "What color is the sky?", 30, "blue"),
        (4, "What animal is this?", 40, "Dog."),  # one answer in the record: exact match, "a dog"
        (5, "What animal is that?", 50, "dog"),  # one answer in the record: "cat"
    ]
    inline = {4: {"answer": "a dog"}, 5: {"answer": "cat"}}
    rows = [
        {
            "question_id": qid,
            "image": write_png(tmp_path, f"{red}.png", red),
            "text": text,
            **inline.get(qid, {}),
        }
        for qid, text, red, _ in questions
    ]
    rows.append({"question_id": 6, "image": "10.png", "text": "Is it raining?"})  # answered nowhere
    path = write_jsonl(tmp_path / "llava_vqav2_val.jsonl", rows)
    records = [
        {"question_id": qid, "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(humans)]}
        for qid, humans in VQA_HUMANS.items()
    ]
    if answers_format == "jsonl":
        answers = write_jsonl(tmp_path / "answers.jsonl", records)
    else:
        answers = tmp_path / "v2_mscoco_val2014_annotations.json"
        answers.write_text(json.dumps({"data_subtype": "val2014", "annotations": records}))
    stub = Stub({(text, red): reply for _, text, red, reply in questions})
    result = evaluate_one("vqa", path, stub, answers)

    per_question = [naive_vqa_v2(reply, VQA_HUMANS[qid]) for qid, _, _, reply in questions[:3]] + [100, 0]
    assert per_question[:3] == pytest.approx([90, 30, 100])
    assert result.metrics == pytest.approx({"accuracy": sum(per_question) / 5})
    assert result.n == 5
    assert result.skipped.summary() == {"invalid_record": 1}
    assert vqa_v2_accuracy("4", VQA_HUMANS[1]) == pytest.approx(naive_vqa_v2("4", VQA_HUMANS[1]))  # 2 say it


# -- captions --------------------------------------------------------------------------------------------


def test_captions_file_scores_equal_the_metrics_on_the_replies(tmp_path):
    references = [
        ["A red circle on the left.", "A red circle."],
        ["Two blue squares.", "Two squares, both blue."],
        ["A green star above a ring.", "A star and a ring."],
    ]
    replies = ["A red circle.", "Three blue squares.", "A yellow star."]
    rows = [
        {"image": write_png(tmp_path, f"{k}.png", k), "captions": refs} for k, refs in enumerate(references)
    ]
    rows.append({"image": "0.png", "captions": []})
    path = write_jsonl(tmp_path / "captions.jsonl", rows)
    prompt = "Provide a one-sentence caption for the provided image."
    stub = Stub({(prompt, k): reply for k, reply in enumerate(replies)})
    result = evaluate_one("captions", path, stub, caption_prompt=prompt, caption_max_new_tokens=40)

    cider = cider_d(
        [caption_tokens(r) for r in replies], [[caption_tokens(t) for t in r] for r in references]
    )
    expected = {"cider_d": cider["cider_d"], "bleu4": corpus_bleu(replies, references)["bleu"]}
    assert result.metrics == pytest.approx(expected)
    assert 0 < result.metrics["bleu4"] < 100
    assert (result.n, result.skipped.summary(), stub.max_new_tokens) == (3, {"invalid_record": 1}, {40})
    perfect = Stub({(prompt, k): refs[0] for k, refs in enumerate(references)})
    assert evaluate_one("captions", path, perfect, caption_prompt=prompt).metrics["bleu4"] == pytest.approx(
        100
    )


# -- MMBench ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("(c) star", "C"),  # opens with a letter
        ("The answer is A.", "A"),  # one letter standing alone
        ("It is a square", "B"),  # one option's text
        ("A", "A"),
        ("A circle or a square", None),  # "A" before a word is the article; two options' texts: no answer
        ("I don't know", None),
    ],
)
def test_mmbench_choice_rules(reply, letter):
    assert mmbench_choice(reply, ["circle", "square", "star", "ring"]) == letter


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """As pandas ``to_csv(sep="\\t")`` writes it: cells with a line break or a quote are quoted."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_mmbench_tsv_circular_accuracy_equals_a_hand_count(tmp_path):
    image = {red: base64.b64encode(png_bytes(red)).decode() for red in (10, 20, 30)}
    hint = "Look closely.\nIt is red."
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        # lines 2-3: a hint with a line break (a quoted cell over two lines)
        ["100", "What shape?", hint, "circle", "square", "star", "ring", "B", "s", image[10]],
        ["101", "What color is it?", "nan", "red", "green", "blue", "", "C", "c", image[20]],  # line 4
        ["102", "Which animal is it?", "", "cat", "dog", "bird", "fish", "A", "a", image[30]],  # line 5
        ["103", "Which one?", "", "x", "y", "", "", "C", "a", image[30]],  # line 6: answer C of 2 options
        ["104", "Which one?", "", "x", "y", "", "", "A", "a", base64.b64encode(b"no image").decode()],
        ["105", "Which one?"],  # line 8: too few cells
    ]  # fmt: skip
    path = write_tsv(tmp_path / "mmbench_dev_en.tsv", header, rows)
    # (image, first option shown) -> reply: each question once per rotation of its options
    replies = {
        (10, "circle"): "B",  # right: square is B
        (10, "square"): "The answer is A.",  # right
        (10, "star"): "square",  # right, by the option's text
        (10, "ring"): "(c)",  # right: square is C
        (20, "red"): "C",  # right: blue is C
        (20, "green"): "C",  # wrong: blue is B
        (20, "blue"): "A",  # right
        (30, "cat"): "dog",  # wrong: the text names B
        (30, "dog"): "D",  # right: cat is D
        (30, "bird"): "C",  # right
        (30, "fish"): "I don't know",  # wrong: no letter
    }
    asked = []

    def stub(questions: list[str], images: list[np.ndarray], max_new_tokens: int) -> list[str]:
        asked.extend(questions)
        first = [next(line[3:] for line in q.split("\n") if line.startswith("A. ")) for q in questions]
        return [replies[(int(im[0, 0, 0]), option)] for im, option in zip(images, first, strict=True)]

    result = evaluate_files([BenchmarkFile("mmbench", path)], stub)["mmbench_dev_en"]

    right = {100: [True, True, True, True], 101: [True, False, True], 102: [False, True, True, False]}
    assert result.metrics == pytest.approx(
        {
            "circular": 100 * sum(all(r) for r in right.values()) / 3,
            "vanilla": 100 * sum(r[0] for r in right.values()) / 3,
        }
    )
    assert result.metrics == pytest.approx({"circular": 100 / 3, "vanilla": 200 / 3})
    assert asked[1] == (  # LLaVA's model_vqa_mmbench.py prompt, options rotated once
        "Look closely.\nIt is red.\nWhat shape?\nA. square\nB. star\nC. ring\nD. circle\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert result.n == 3
    assert result.skipped.summary() == {"corrupt_image": 1, "invalid_record": 1, "malformed_csv": 1}
    assert result.skipped.examples["invalid_record"] == [f"{path}, line 6 (index 103)"]
    assert result.skipped.examples["malformed_csv"] == [f"{path}, line 8"]


def test_benchmark_specs_are_checked(tmp_path):
    questions, answers = write_jsonl(tmp_path / "q.jsonl", []), write_jsonl(tmp_path / "a.jsonl", [])
    assert parse_benchmark(f"vqa={questions},{answers}") == BenchmarkFile("vqa", questions, answers)
    with pytest.raises(ValueError, match="KIND one of pope, vqa, captions, mmbench"):
        parse_benchmark(f"gqa={questions}")
    with pytest.raises(ValueError, match="pope takes one file"):
        parse_benchmark(f"pope={questions},{answers}")
    with pytest.raises(ValueError, match="is not a file"):
        parse_benchmark(f"pope={tmp_path / 'missing.jsonl'}")


# -- the CLI on a real model -----------------------------------------------------------------------------


def test_eval_command_scores_a_pope_file_and_counts_the_skipped_record(tmp_path, capsys):
    from mmfactory.cli import main

    model, tokenizer, image_processor = tiny_mllm()
    with torch.no_grad():  # replies that differ from image to image
        for p in model.projector.parameters():
            p.normal_(std=0.5)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    MultimodalProcessor(tokenizer, image_processor, model.config.num_image_tokens).save_pretrained(folder)
    rows = [
        {
            "question_id": 1,
            "image": write_png(tmp_path, "a.png", 200),
            "text": "Is there a cat?",
            "label": "yes",
        },
        {
            "question_id": 2,
            "image": write_png(tmp_path, "b.png", 20),
            "text": "Is there a dog?",
            "label": "no",
        },
        {"question_id": 3, "image": "missing.png", "text": "Is there a car?", "label": "yes"},
    ]
    path = write_jsonl(tmp_path / "pope.jsonl", rows)
    out = tmp_path / "results.json"
    command = ["eval", "--model", str(folder), "--benchmark", f"pope={path}", "--max-new-tokens", "3"]
    assert main([*command, "--output", str(out)]) == 0
    result = json.loads(out.read_text())["benchmarks"]["pope"]
    assert (result["n"], result["skipped"]) == (2, {"missing_file": 1})
    assert "skipped 1 bad sample: missing_file 1" in capsys.readouterr().out

    # the same replies, generated directly and read by hand into the five metrics
    model, processor = load_mllm(folder)
    conversations = [[{"role": "user", "content": f"<image>\n{row['text']}"}] for row in rows[:2]]
    images = [[np.array(Image.open(tmp_path / row["image"]).convert("RGB"))] for row in rows[:2]]
    replies = generate_multimodal_replies(
        model, processor, conversations, images, GenerationConfig(max_new_tokens=3)
    )
    said_no = [
        any(w in ("No", "no", "not") for w in r.split(".")[0].replace(",", "").split(" ")) for r in replies
    ]
    predicted = ["no" if no else "yes" for no in said_no]
    tp, fp = int(predicted[0] == "yes"), int(predicted[1] == "yes")  # labels: yes, no
    precision, recall = (tp / (tp + fp) if tp + fp else 0.0), float(tp)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    expected = {"accuracy": 50 * (tp + 1 - fp), "precision": 100 * precision, "recall": 100 * recall}
    expected |= {"f1": 100 * f1, "yes_ratio": 50 * (tp + fp)}
    assert result["metrics"] == pytest.approx(expected)

    assert main([*command, "--strict"]) == 2
    assert "pope.jsonl, line 3 (question_id 3): image file" in capsys.readouterr().err
    assert main(["eval", "--model", str(folder), "--output", str(out)]) == 2  # --output needs --benchmark
