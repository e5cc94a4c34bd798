"""Bad records in a video caption CSV are per-line bad samples with the right line, never crashes or
swallowed rows: bytes that are not UTF-8 and an unclosed quote."""

import pytest

from mmfactory.data.policy import BadSampleCounter, BadSampleError
from mmfactory.data.readers import read_video_captions


def _csv(tmp_path, body: bytes):
    (tmp_path / "videos").mkdir()
    for i in range(20):
        (tmp_path / "videos" / f"v{i}.mp4").write_bytes(b"")
    path = tmp_path / "train.csv"
    path.write_bytes(b"video_id,sentence\n" + body)
    return path


def test_non_utf8_and_an_unclosed_quote_are_bad_lines_and_the_rest_is_kept(tmp_path):
    rows = [f"v{i},caption {i}".encode() for i in range(20)]
    rows[3] = b"v3,caf\xe9 latin-1"  # not UTF-8
    rows[6] = b'v6,"an unclosed quote'  # would swallow every later line with csv's own line handling
    path = _csv(tmp_path, b"\n".join(rows) + b"\n")
    with pytest.raises(BadSampleError, match=r"train.csv, line 5: not UTF-8"):
        read_video_captions(path, check_media=False)
    counter = BadSampleCounter()
    dataset = read_video_captions(path, on_bad_sample="skip", counter=counter, check_media=False)
    assert [r.fields["video_id"] for r in dataset.records] == [f"v{i}" for i in range(20) if i not in (3, 6)]
    assert counter.summary() == {"malformed_csv": 2}
    assert [e.split(": ")[0].rsplit(", ", 1)[1] for e in counter.examples["malformed_csv"]] == [
        "line 5",
        "line 8",
    ]
