import pickle

import pytest

from mmfactory.data.policy import (
    BadReason,
    BadSampleCounter,
    BadSampleError,
    check_policy,
    handle_bad_sample,
)


def test_error_message_names_file_record_and_problem():
    error = BadSampleError(
        "field 'text' is empty", reason=BadReason.EMPTY_TEXT, file="a/train.jsonl", record="line 3"
    )
    assert str(error) == "a/train.jsonl, line 3: field 'text' is empty"
    assert isinstance(error, ValueError) and error.reason == "empty_text"


def test_located_keeps_the_media_path_in_the_problem():
    media_error = BadSampleError(
        "cannot decode image: truncated", reason=BadReason.CORRUPT_IMAGE, file="img/x.png"
    )
    error = media_error.located("pairs.jsonl", "line 2 (id 'x')")
    assert str(error) == "pairs.jsonl, line 2 (id 'x'): img/x.png: cannot decode image: truncated"
    assert error.reason is BadReason.CORRUPT_IMAGE and error.file == "pairs.jsonl"
    unplaced = BadSampleError("missing field 'id'", reason=BadReason.INVALID_RECORD)
    assert str(unplaced.located("f.jsonl", "line 1")) == "f.jsonl, line 1: missing field 'id'"


def _error(reason: BadReason, record: str) -> BadSampleError:
    return BadSampleError("bad", reason=reason, file="f.jsonl", record=record)


def test_counter_counts_by_reason_keeps_examples_and_merges():
    first = BadSampleCounter(max_examples=2)
    for line in range(1, 4):
        first.add(_error(BadReason.MISSING_FILE, f"line {line}"))
    second = BadSampleCounter()
    second.add(_error(BadReason.EMPTY_TEXT, "line 9"))
    second.add(_error(BadReason.MISSING_FILE, "line 7"))
    assert first.examples["missing_file"] == ["f.jsonl, line 1", "f.jsonl, line 2"]
    assert first.merge(second) is first
    assert first.summary() == {"empty_text": 1, "missing_file": 4}
    assert first.total == 5
    assert first.examples["missing_file"] == ["f.jsonl, line 1", "f.jsonl, line 2"]  # still max_examples
    assert first.report() == (
        "skipped 5 bad samples: empty_text 1 (e.g. f.jsonl, line 9); missing_file 4 (e.g. f.jsonl, line 1)"
    )
    assert BadSampleCounter().report() == "skipped 0 bad samples"


def test_handle_bad_sample_raises_or_counts():
    counter = BadSampleCounter()
    error = _error(BadReason.CORRUPT_AUDIO, "index 0")
    with pytest.raises(BadSampleError, match="f.jsonl, index 0: bad"):
        handle_bad_sample(error, "error", counter)
    assert counter.total == 0
    handle_bad_sample(error, "skip", counter)
    assert counter.summary() == {"corrupt_audio": 1}
    with pytest.raises(ValueError, match="on_bad_sample must be one of"):
        handle_bad_sample(error, "ignore", counter)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'skp'"):
        check_policy("skp")


def test_error_survives_pickling():
    error = _error(BadReason.WRONG_SAMPLE_RATE, "index 2")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.reason is error.reason and copy.record == "index 2"
