"""LLaVA-MoD's prepare steps: the stored teacher top-k equals, byte for byte, the top-k written straight from
the teacher; it is reused while valid and refused when the teacher, K, data or tokenizer changed; a prepare
killed midway leaves nothing a rerun reuses; a process other than the main one reads and never writes; the
on-policy pairs are sampled once and reused."""

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import AddedToken

from mmfactory.artifacts import FINGERPRINT_FILE, ArtifactMismatch, fingerprint_digest, recorded_fingerprint
from mmfactory.config import StageConfig, from_dict
from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.data.teacher_logits import write_teacher_topk
from mmfactory.llava_mod import on_policy, teacher
from mmfactory.llava_mod.teacher import OnlineTeacher, StoredTopK
from mmfactory.losses.distill import teacher_topk
from mmfactory.models.mllm import MultimodalLM
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.tasks.mllm import response_logits
from tests.helpers import TINY_LM, world_data
from tests.models.test_mllm import TINY_VISION, tiny_mllm

DATA = world_data(["vqa", "captions"], 5, 0, image_size=16)
EVAL = {"eval": {"vqa": 0, "pope": 0, "captions": 0}}
K = 8


class Accelerator(SimpleNamespace):
    """What ``prepare`` uses of an accelerate ``Accelerator``."""

    def __init__(self, main: bool = True):
        super().__init__(is_main_process=main, waits=0)

    def wait_for_everyone(self) -> None:
        self.waits += 1


def save(folder, model, tokenizer, image_processor):
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save(tmp_path_factory.mktemp("teacher"), *tiny_mllm(seed=1))


def mimic(run, teacher_dir, data=None, stage_name="distill", **options):
    torch.manual_seed(0)
    raw = {
        "name": stage_name,
        "task": "mllm_mimic_distill",
        "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": dict(TINY_LM)}},
        "data": data or DATA,
        "options": {**EVAL, "teacher": str(teacher_dir), "mode": "kd_only", "teacher_topk": K, **options},
    }
    stage = from_dict(StageConfig, raw, "stage")
    return build_task(stage, 0, StageContext(run, run / stage_name))


def files(root) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_the_teacher_signal_is_chosen_once_and_collate_follows_it(tmp_path, teacher_dir):
    stored, online = mimic(tmp_path, teacher_dir), mimic(tmp_path, teacher_dir, teacher_topk=None)
    assert isinstance(stored.signal, StoredTopK) and stored.teacher is None
    assert isinstance(online.signal, OnlineTeacher) and online.signal.teacher is online.teacher
    stored.prepare(Accelerator())
    online.prepare(Accelerator())  # nothing to prepare
    assert not (tmp_path / "distill" / ".teacher_topk.tmp").exists()
    items = [stored.train_dataset()[i] for i in (0, 1)]
    assert isinstance(items[0], tuple) and {"teacher_logprobs", "teacher_indices"} <= set(
        stored.collate(items)
    )
    assert "teacher_logprobs" not in online.collate([online.train_dataset()[i] for i in (0, 1)])


def test_the_stored_top_k_is_byte_identical_to_the_top_k_written_straight_from_the_teacher(
    tmp_path, teacher_dir
):
    task = mimic(tmp_path, teacher_dir, teacher_topk_batch_size=2)
    task.prepare(Accelerator())
    folder = tmp_path / "distill" / "teacher_topk"
    key = recorded_fingerprint(folder)
    assert key["k"] == K and key["artifact"] == "teacher_topk" and key["teacher"].startswith("files:")

    # The reference: the teacher from its folder, through the generic writer.
    model = MultimodalLM.from_pretrained(teacher_dir).eval()
    dataset = task.train_dataset().dataset

    @torch.no_grad()
    def topk_of_batch(indices):
        batch = task.processor.collate([dataset[i] for i in indices])
        logprobs, ids = teacher_topk(response_logits(model, batch), K)
        return logprobs, ids, (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()

    batches = [[i, i + 1] for i in range(0, len(dataset), 2)]  # the same batches of two
    write_teacher_topk(tmp_path / "reference", batches, topk_of_batch, K, fingerprint_digest(key))
    for name in ("topk-00000.safetensors", "index.json"):
        assert (folder / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert sorted(p.name for p in folder.iterdir()) == [
        FINGERPRINT_FILE,
        "index.json",
        "topk-00000.safetensors",
    ]


def test_the_stored_top_k_is_reused_and_refused_when_the_teacher_k_or_data_changed(tmp_path, teacher_dir):
    mimic(tmp_path, teacher_dir).prepare(Accelerator())
    before = files(tmp_path)
    again = mimic(tmp_path, teacher_dir)
    again.prepare(Accelerator())
    assert files(tmp_path) == before and len(again.train_dataset()) == 10  # reused: nothing rewritten

    with pytest.raises(ArtifactMismatch, match="prepared from another k .*delete .* or use another --output"):
        mimic(tmp_path, teacher_dir, teacher_topk=4).prepare(Accelerator())
    with pytest.raises(ArtifactMismatch, match="prepared from another data, samples"):
        mimic(tmp_path, teacher_dir, data=world_data(["vqa"], 5, 0, image_size=16)).prepare(Accelerator())
    moved = save(
        tmp_path / "teacher", *tiny_mllm(seed=1)
    )  # the same weights in another folder, say retrained
    with pytest.raises(ArtifactMismatch, match="prepared from another teacher"):
        mimic(tmp_path, moved).prepare(Accelerator())
    assert files(tmp_path / "distill") == {k[len("distill/") :]: v for k, v in before.items()}


def test_the_stored_top_k_is_refused_when_the_tokenizer_changed(tmp_path, teacher_dir):
    model, tokenizer, image_processor = tiny_mllm(seed=0)
    save(tmp_path / "student", model, tokenizer, image_processor)
    tokenizer.add_tokens([AddedToken("<extra>", special=True)], special_tokens=True)
    model.language_model.resize_token_embeddings(len(tokenizer))
    save(tmp_path / "student2", model, tokenizer, image_processor)

    def from_student(folder):
        torch.manual_seed(0)
        raw = {
            "name": "distill",
            "task": "mllm_mimic_distill",
            "init_from": str(folder),
            "data": DATA,
            "options": {**EVAL, "teacher": str(teacher_dir), "mode": "kd_only", "teacher_topk": K},
        }
        return build_task(
            from_dict(StageConfig, raw, "stage"), 0, StageContext(tmp_path, tmp_path / "distill")
        )

    from_student(tmp_path / "student").prepare(Accelerator())
    with pytest.raises(ArtifactMismatch, match="prepared from another tokenizer"):
        from_student(tmp_path / "student2").prepare(Accelerator())


def test_a_prepare_killed_midway_leaves_nothing_a_rerun_reuses(tmp_path, teacher_dir, monkeypatch):
    calls = []

    def dies_on_the_second_batch(logits, k):
        calls.append(k)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after a batch was computed
        return teacher_topk(logits, k)

    monkeypatch.setattr(teacher, "teacher_topk", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        mimic(tmp_path, teacher_dir, teacher_topk_batch_size=2).prepare(Accelerator())
    assert list((tmp_path / "distill").iterdir()) == []
    monkeypatch.setattr(teacher, "teacher_topk", teacher_topk)
    task = mimic(tmp_path, teacher_dir, teacher_topk_batch_size=2)
    task.prepare(Accelerator())  # rebuilt in full
    assert len(task.train_dataset()) == 10 and len(task.signal.cache) == 10


def test_a_process_other_than_the_main_one_reads_the_stored_top_k_and_never_writes(
    tmp_path, teacher_dir, monkeypatch
):
    def no_writing(*args, **kwargs):
        raise AssertionError("a process other than the main one wrote the top-k")

    main, other = mimic(tmp_path, teacher_dir), mimic(tmp_path, teacher_dir)
    with monkeypatch.context() as patch:
        patch.setattr(teacher, "write_teacher_topk", no_writing)
        with pytest.raises(FileNotFoundError, match="the main process prepared no artifact"):
            other.prepare(Accelerator(main=False))  # the main process did not write it
    assert not (tmp_path / "distill").exists()

    main.prepare(Accelerator())
    before = files(tmp_path)
    monkeypatch.setattr(teacher, "write_teacher_topk", no_writing)
    reader = Accelerator(main=False)
    other.prepare(reader)
    assert reader.waits == 1 and files(tmp_path) == before
    a, b = main.train_dataset()[3], other.train_dataset()[3]
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_another_stages_stored_top_k_is_read_by_name_and_never_written(tmp_path, teacher_dir):
    mimic(tmp_path, teacher_dir, stage_name="first").prepare(Accelerator())
    raw = {
        "name": "second",
        "task": "mllm_mimic_distill",
        "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": dict(TINY_LM)}},
        "data": DATA,
        "options": {**EVAL, "teacher": str(teacher_dir), "mode": "kd_only", "teacher_topk": K},
    }
    stage = from_dict(StageConfig, {**raw, "options": {**raw["options"], "teacher_topk_dir": "first"}}, "s")
    ctx = StageContext(tmp_path, tmp_path / "second", {"first": tmp_path / "first" / "final"})
    task = build_task(stage, 1, ctx)
    task.prepare(Accelerator())
    assert task.signal.folder == tmp_path / "first" / "teacher_topk" and not (tmp_path / "second").exists()
    assert len(task.train_dataset()) == 10

    other_k = from_dict(
        StageConfig,
        {**raw, "options": {**raw["options"], "teacher_topk_dir": "first", "teacher_topk": 4}},
        "s",
    )
    with pytest.raises(ArtifactMismatch, match="another k .*point options.teacher_topk_dir elsewhere"):
        build_task(other_k, 1, ctx).prepare(Accelerator())


def preference(run, teacher_dir, **sampling):
    prompts = world_data(["vqa", "captions"], 3, 0, image_size=16)["train"]
    data = {
        "train": [],
        "eval": [],
        "prompts": prompts,
        "on_policy": {"samples_per_prompt": 3, "max_new_tokens": 6, **sampling},
    }
    raw = {
        "name": "pref",
        "task": "mllm_preference_distill",
        "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": dict(TINY_LM)}},
        "data": data,
        "options": {**EVAL, "teacher": str(teacher_dir)},
    }
    torch.manual_seed(0)
    return build_task(from_dict(StageConfig, raw, "stage"), 0, StageContext(run, run / "pref"))


def test_on_policy_pairs_are_sampled_once_by_the_main_process_and_reused(tmp_path, teacher_dir, monkeypatch):
    first = preference(tmp_path, teacher_dir)
    first.prepare(Accelerator())  # samples for real (the tiny student's replies)
    pairs = first.pairs("train")
    folder = tmp_path / "pref" / "on_policy_pairs"
    lines = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().split("\n") if line]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in lines] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in pairs
    ]
    assert pairs and first.counts["train/sampled_replies"] == 18

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(on_policy, "generate_multimodal_replies", no_sampling)
    before = files(tmp_path)
    second = preference(tmp_path, teacher_dir)
    second.prepare(Accelerator(main=False))
    again = second.pairs("train")
    assert files(tmp_path) == before
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in again] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in pairs
    ]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(pairs, again, strict=True))
    assert second.data_report() == first.data_report()  # sampling counts come with the pairs

    with pytest.raises(ArtifactMismatch, match="prepared from another sampling"):
        preference(tmp_path, teacher_dir, temperature=0.5).prepare(Accelerator())


def test_on_policy_pairs_are_not_read_before_prepare(tmp_path, teacher_dir):
    with pytest.raises(RuntimeError, match="before the stage's prepare step"):
        preference(tmp_path, teacher_dir).train_dataset()


def test_pairs_read_back_exactly_whatever_line_breaks_a_reply_holds(tmp_path):
    replies = ["a\nb", "c\u2028d", "e\x85f\r", "红色\u2029"]
    pairs = [
        {"prompt_index": i, "prompt": "<image>\nq", "chosen": r, "rejected": r[::-1]}
        for i, r in enumerate(replies)
    ]
    on_policy.write_pairs(tmp_path, pairs, Counter({"train/sampled_replies": 8}))
    counts = Counter()
    back = on_policy.read_pairs(tmp_path, lambda i: [f"image {i}"], counts)
    assert [(p["chosen"], p["rejected"], p["image"]) for p in back] == [
        (r, r[::-1], f"image {i}") for i, r in enumerate(replies)
    ]
    assert counts == {"train/sampled_replies": 8}
