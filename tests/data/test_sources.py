"""The data-source layer: each format read from a real file, one data set in several formats gives the
same samples, mixture weights give their proportions, and bad records are errors naming file and record
or counted skips."""

import re
from collections import Counter

import numpy as np
import pytest

from mmfactory.config import ConfigError, from_dict
from mmfactory.data.policy import BadSampleError, DataError
from mmfactory.data.samples import mix
from mmfactory.data.source_config import SourceConfig
from mmfactory.data.sources import read_sources

TURNS = [("What colour is the circle?", "red"), ("And the square?", "blue")]


def source(**raw) -> SourceConfig:
    return from_dict(SourceConfig, raw, "source")


def read(sample_kind="image-chat", **raw):
    counts = Counter()
    return read_sources([source(**raw)], sample_kind, counts, "train", report=False), counts


def llava_row(i: int, image: str | None = "a.png", token: bool = True) -> dict:
    first = f"<image>\n{TURNS[0][0]}" if token and image else TURNS[0][0]
    row = {
        "id": str(i),
        "conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": "red"}],
    }
    return row if image is None else {**row, "image": image}


EXPECTED = [{"role": "user", "content": f"<image>\n{TURNS[0][0]}"}, {"role": "assistant", "content": "red"}]


def test_llava_images_resolve_against_image_root_as_llavas_image_folder(files):
    files.png("images/coco/a.png", size=(6, 8))
    path = files.json("annotations/llava.json", [llava_row(0, "coco/a.png")])
    # relative to the annotation file's folder the image does not exist ...
    with pytest.raises(BadSampleError, match=r"llava.json, index 0 \(id '0'\): image file .* not found"):
        read(format="llava", path=str(path))
    # ... relative to image_root it does
    conversations, _ = read(format="llava", path=str(path), image_root=str(files.root / "images"))
    assert conversations.messages == [EXPECTED]
    assert conversations.images(0)[0].shape == (6, 8, 3)


@pytest.mark.parametrize(
    ("policy", "kept", "count"),
    [
        ("prepend", 3, {"train/llava_image_token_prepended": 1}),
        ("skip", 2, {"train/llava_skipped_missing_image_token": 1}),
    ],
)
def test_a_llava_row_whose_image_has_no_token_follows_the_policy_and_is_counted(files, policy, kept, count):
    files.png("a.png")
    rows = [llava_row(0), llava_row(1, token=False), llava_row(2, image=None)]
    path = files.json("llava.json", rows)
    conversations, counts = read(format="llava", path=str(path), missing_image_token=policy)
    assert len(conversations.messages) == kept and counts == count
    if policy == "prepend":  # LLaVA's layout: the image first in the first user turn
        assert conversations.messages[1] == EXPECTED and conversations.num_images == [1, 1, 0]
    with pytest.raises(BadSampleError, match=r"index 1 \(id '1'\): 0 <image> placeholders for 1 images"):
        read(format="llava", path=str(path), missing_image_token="error")


def test_one_conversation_in_four_formats_gives_the_same_sample(files):
    files.png("a.png", seed=3)
    user, reply = f"<image>\n{TURNS[0][0]}", "red"
    paths = {
        "llava": files.json("llava.json", [llava_row(0)]),
        "sharegpt": files.jsonl(
            "sharegpt.jsonl",
            [
                {
                    "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}],
                    "images": ["a.png"],
                }
            ],
        ),
        "messages": files.json(
            "messages.json",  # TRL style: content parts, images in their own column
            [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image"}, {"type": "text", "text": TURNS[0][0]}],
                        },
                        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
                    ],
                    "images": ["a.png"],
                }
            ],
        ),
    }
    read_back = {fmt: read(format=fmt, path=str(path))[0] for fmt, path in paths.items()}
    for conversations in read_back.values():
        assert conversations.messages == [EXPECTED]
        np.testing.assert_array_equal(conversations.images(0)[0], read_back["llava"].images(0)[0])


def test_alpaca_rows_become_chats_with_history_system_and_input(files):
    path = files.jsonl(
        "alpaca.jsonl",
        [
            {"instruction": "Translate", "input": "rouge", "output": "red"},
            {"instruction": "Again", "output": "blue", "system": "Be brief.", "history": [["Hi", "Hello"]]},
        ],
    )
    conversations, _ = read("chat", format="alpaca", path=str(path))
    assert conversations.messages == [
        [{"role": "user", "content": "Translate\nrouge"}, {"role": "assistant", "content": "red"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "blue"},
        ],
    ]


def test_columns_rename_a_files_keys(files):
    path = files.jsonl(
        "chat.jsonl",
        [{"dialog": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
    )
    conversations, _ = read("chat", format="messages", path=str(path), columns={"messages": "dialog"})
    assert conversations.messages[0][1] == {"role": "assistant", "content": "Yo"}


def test_bad_rows_are_errors_naming_file_and_line_or_counted_skips(files):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    path = files.jsonl(
        "chat.jsonl", [good, "{not json", {"messages": [{"role": "user", "content": "only"}]}, good]
    )
    with pytest.raises(BadSampleError, match=r"chat.jsonl, line 2: malformed JSON"):
        read("chat", format="messages", path=str(path))
    conversations, counts = read("chat", format="messages", path=str(path), on_bad_sample="skip")
    assert len(conversations.messages) == 2
    assert counts == {"train/bad_malformed_json": 1, "train/bad_invalid_record": 1}
    # the share is of the records read, whatever limit keeps afterwards
    limited = source(format="messages", path=str(path), on_bad_sample="skip", limit=1)
    assert len(read_sources([limited], "chat", Counter(), "train", 0.5, report=False).messages) == 1
    with pytest.raises(DataError, match=r"2 of 4 records are bad \(50.0% > max_bad_fraction 25.0%\)"):
        read_sources(
            [source(format="messages", path=str(path), on_bad_sample="skip")],
            "chat",
            Counter(),
            "train",
            0.25,
            report=False,
        )


def test_the_skip_report_is_printed_with_up_to_five_examples(files, capsys):
    path = files.jsonl("chat.jsonl", ["{"] * 7)
    read_sources(
        [source(format="messages", path=str(path), on_bad_sample="skip")], "chat", Counter(), "train"
    )
    err = capsys.readouterr().err
    assert "skipped 7 bad samples: malformed_json 7" in err
    assert err.count("chat.jsonl, line") == 5


def test_mixture_weights_give_the_stated_proportions_deterministically(files):
    a = read("image-chat", format="world", kind="vqa", size=30, image_size=8)[0]
    b = read("image-chat", format="world", kind="captions", size=10, image_size=8)[0]
    mixed = mix([a, b], [1.0, 3.0], seed=0)
    assert len(mixed.messages) == 40
    from_b = sum(m in b.messages for m in mixed.messages)
    assert from_b == 30  # 3/4 of 40, b's 10 samples each drawn 3 times
    assert Counter(map(str, mixed.messages)) == Counter(
        {**{str(m): 3 for m in b.messages}, **Counter(str(m) for m in mixed.messages if m not in b.messages)}
    )
    again = mix([a, b], [1.0, 3.0], seed=0)
    assert again.messages == mixed.messages
    assert mix([a, b], [1.0, 3.0], seed=1).messages != mixed.messages
    np.testing.assert_array_equal(mixed.images(39)[0], again.images(39)[0])
    with pytest.raises(ConfigError, match="every source of the stage or on none"):
        mix([a, b], [1.0, None])


def test_limit_keeps_the_first_samples():
    full = read(format="world", kind="vqa", size=6, image_size=8)[0]
    first = read(format="world", kind="vqa", size=6, image_size=8, limit=2)[0]
    assert first.messages == full.messages[:2]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"format": "lava", "path": "x.json"}, "format: unknown format 'lava' (did you mean 'llava'?)"),
        ({"format": "llava"}, "path: format 'llava' needs a path"),
        ({"format": "world"}, "kind: format 'world' needs a kind"),
        (
            {"format": "alpaca", "path": "a.json", "image_root": "img"},
            "image_root: not read by format 'alpaca'",
        ),
        ({"format": "world", "kind": "vqa", "size": -1}, "size: must be >= 0, got -1"),
        ({"format": "llava", "path": "x.json", "weight": 0}, "weight: must be > 0, got 0"),
    ],
)
def test_a_bad_source_is_refused_before_anything_is_read(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        source(**raw)


def test_a_task_refuses_a_format_that_does_not_yield_its_kind(files):
    with pytest.raises(
        ConfigError, match="format 'alpaca' yields chat samples, this task reads 'image-chat'"
    ):
        read("image-chat", format="alpaca", path=str(files.jsonl("a.jsonl", [])))
    with pytest.raises(
        ConfigError, match="world kind 'vqa' yields image-chat samples, this task reads 'chat'"
    ):
        read("chat", format="world", kind="vqa", size=2)


def test_hf_parquet_written_by_pyarrow_and_a_saved_dataset_give_the_llava_files_samples(files):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    files.png("a.png", seed=5)
    files.png("b.png", seed=6)
    rows = [llava_row(0, "a.png"), llava_row(1, "b.png"), llava_row(2, image=None)]
    expected = read(format="llava", path=str(files.json("llava.json", rows)))[0]
    sharegpt = [[{"from": t["from"], "value": t["value"]} for t in r["conversations"]] for r in rows]
    # parquet with ShareGPT columns under other names and image paths relative to image_root
    table = pa.table({"dialog": sharegpt, "pictures": [["a.png"], ["b.png"], []]})
    pq.write_table(table, files.root / "data.parquet")
    parquet = read(
        format="hf",
        path=str(files.root / "data.parquet"),
        image_root=str(files.root),
        columns={"conversations": "dialog", "images": "pictures"},
    )[0]
    # a datasets.Dataset with an Image feature (PNG bytes inside), saved to disk and loaded by its folder
    messages = [
        [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
        for turns in sharegpt
    ]
    features = datasets.Features(
        {
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "images": datasets.List(datasets.Image()),
        }
    )
    images = [[str(files.root / "a.png")], [str(files.root / "b.png")], []]
    saved = datasets.Dataset.from_dict({"messages": messages, "images": images}, features=features)
    saved.save_to_disk(str(files.root / "saved"))
    (files.root / "a.png").unlink()  # the saved dataset holds the bytes itself
    from_disk = read(format="hf", dataset=str(files.root / "saved"))[0]
    files.png("a.png", seed=5)
    for conversations in (parquet, from_disk):
        assert conversations.messages == expected.messages and conversations.num_images == [1, 1, 0]
        for i in range(3):
            for got, want in zip(conversations.images(i), expected.images(i), strict=True):
                np.testing.assert_array_equal(got, want)


def test_hf_rows_that_do_not_fit_are_errors_naming_the_row_or_counted_skips(files):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    table = pa.table({"messages": [good, [{"role": "user", "content": "only"}], good]})
    pq.write_table(table, files.root / "chat.parquet")
    path = str(files.root / "chat.parquet")
    with pytest.raises(BadSampleError, match=r"chat.parquet, row 1: 'messages' has no assistant turn"):
        read("chat", format="hf", path=path)
    conversations, counts = read("chat", format="hf", path=path, on_bad_sample="skip")
    assert conversations.messages == [good, good] and counts == {"train/bad_invalid_record": 1}
    with pytest.raises(ConfigError, match="has none of the columns messages, conversations, instruction"):
        read("chat", format="hf", path=path, columns={"text": "messages"})
