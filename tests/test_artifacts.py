"""The artifacts helper of the prepare step: built once by the main process and reused while its fingerprint
holds; refused (naming what differs) when the teacher, K, data or tokenizer changed; a build that dies
midway leaves nothing a rerun would reuse; processes other than the main one never write. Also the stage
context's view of artifacts and fingerprints, and the runner calling ``prepare`` before the stage's work."""

import os
from pathlib import Path

import pytest
import torch

from mmfactory import runner
from mmfactory.artifacts import (
    FINGERPRINT_FILE,
    ArtifactMismatch,
    build_artifact,
    check_artifact,
    prepare_artifact,
    recorded_fingerprint,
)
from mmfactory.config import StageConfig, from_dict
from mmfactory.tasks.base import StageContext, TrainingTask

FINGERPRINT = {
    "teacher": "stage:3f2a",
    "k": 16,
    "data": {"train": [{"format": "world", "kind": "vqa", "size": 8}], "digest": "9c1e"},
    "tokenizer": "77ab",
}
CHANGED = {
    "teacher": "stage:0000",
    "k": 8,
    "data": {"train": [{"format": "world", "kind": "vqa", "size": 9}], "digest": "1111"},
    "tokenizer": "88cd",
}


class FakeAccelerator:
    """``is_main_process`` and a barrier that records its calls (and runs ``during_wait``: what the main
    process does meanwhile)."""

    def __init__(self, main: bool = True, during_wait=None):
        self.is_main_process, self.during_wait, self.waits = main, during_wait, 0

    def wait_for_everyone(self) -> None:
        self.waits += 1
        if self.during_wait is not None:
            self.during_wait()


class Builder:
    """Writes ``part-0.bin``, ``part-1.bin`` ...; raises after ``fail_after`` parts if set."""

    def __init__(self, parts: int = 3, fail_after: int | None = None):
        self.parts, self.fail_after, self.calls = parts, fail_after, 0

    def __call__(self, tmp: Path, bar) -> None:
        self.calls += 1
        for i in range(self.parts):
            if i == self.fail_after:
                raise RuntimeError("killed")
            (tmp / f"part-{i}.bin").write_bytes(bytes([i]) * 10)
            bar.update(1)


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_an_artifact_is_built_once_then_reused_while_its_fingerprint_holds(tmp_path):
    folder, build = tmp_path / "stage" / "teacher_topk", Builder()
    accelerator = FakeAccelerator()
    assert prepare_artifact(accelerator, folder, FINGERPRINT, build, total=3) == folder
    assert build.calls == 1 and accelerator.waits == 1
    assert sorted(p.name for p in folder.iterdir()) == [
        FINGERPRINT_FILE,
        "part-0.bin",
        "part-1.bin",
        "part-2.bin",
    ]
    assert recorded_fingerprint(folder) == FINGERPRINT
    assert [p.name for p in folder.parent.iterdir()] == ["teacher_topk"]  # no temporary folder left
    before = files(tmp_path)
    again = Builder()
    prepare_artifact(FakeAccelerator(), folder, dict(reversed(FINGERPRINT.items())), again)  # key order: same
    assert again.calls == 0 and files(tmp_path) == before


@pytest.mark.parametrize("field", ["teacher", "k", "data", "tokenizer"])
def test_an_artifact_made_from_another_teacher_k_data_or_tokenizer_is_refused(tmp_path, field):
    folder = tmp_path / "teacher_topk"
    prepare_artifact(FakeAccelerator(), folder, FINGERPRINT, Builder())
    before = files(tmp_path)
    build = Builder()
    with pytest.raises(ArtifactMismatch, match=f"prepared from another {field}") as refused:
        prepare_artifact(FakeAccelerator(), folder, {**FINGERPRINT, field: CHANGED[field]}, build)
    message = str(refused.value)
    assert str(folder) in message and "delete" in message and "another --output" in message
    assert "\n" not in message
    if field == "k":
        assert "k (16 there, 8 now)" in message  # short values are shown
    assert build.calls == 0 and files(tmp_path) == before  # neither rebuilt nor touched


def test_a_refusal_can_carry_its_own_fix_and_names_every_field_that_differs(tmp_path):
    folder = tmp_path / "cache"
    prepare_artifact(FakeAccelerator(), folder, FINGERPRINT, Builder())
    with pytest.raises(
        ArtifactMismatch, match=r"another k \(16 there, 8 now\), tokenizer .*: point it elsewhere$"
    ):
        check_artifact(folder, {**FINGERPRINT, "k": 8, "tokenizer": "x"}, fix="point it elsewhere")
    with pytest.raises(ArtifactMismatch, match="another extra"):
        check_artifact(folder, {**FINGERPRINT, "extra": 1})  # a field added since: refused, not ignored


def test_a_folder_that_records_no_fingerprint_is_refused(tmp_path):
    (tmp_path / "teacher_topk").mkdir()
    (tmp_path / "teacher_topk" / "index.json").write_text("{}")  # say, a cache of an older version
    with pytest.raises(ArtifactMismatch, match="records no fingerprint.json"):
        prepare_artifact(FakeAccelerator(), tmp_path / "teacher_topk", FINGERPRINT, Builder())


def test_a_build_that_dies_midway_leaves_nothing_and_the_rerun_builds_it(tmp_path):
    folder = tmp_path / "teacher_topk"
    with pytest.raises(RuntimeError, match="killed"):
        prepare_artifact(FakeAccelerator(), folder, FINGERPRINT, Builder(fail_after=2))
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor its temporary folder
    assert check_artifact(folder, FINGERPRINT) is False
    build = Builder()
    prepare_artifact(FakeAccelerator(), folder, FINGERPRINT, build)
    assert build.calls == 1 and len(list(folder.glob("part-*.bin"))) == 3


def test_a_killed_build_leaves_a_temporary_folder_that_nothing_reads_and_the_rerun_removes(tmp_path):
    folder = tmp_path / "teacher_topk"
    leftover = tmp_path / ".teacher_topk.tmp-99999"  # killed (SIGKILL) after writing even its fingerprint
    leftover.mkdir()
    (leftover / "part-0.bin").write_bytes(b"half")
    (leftover / FINGERPRINT_FILE).write_text("{}")
    assert check_artifact(folder, FINGERPRINT) is False
    build = Builder()
    prepare_artifact(FakeAccelerator(), folder, FINGERPRINT, build)
    assert build.calls == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["teacher_topk"]
    assert (folder / "part-0.bin").read_bytes() == bytes([0]) * 10


def test_other_processes_wait_for_the_main_one_and_never_write(tmp_path):
    folder = tmp_path / "teacher_topk"
    main_build = Builder()
    # The barrier: meanwhile the main process builds the artifact.
    other = FakeAccelerator(main=False, during_wait=lambda: build_artifact(folder, FINGERPRINT, main_build))
    never = Builder()
    assert prepare_artifact(other, folder, FINGERPRINT, never) == folder
    assert never.calls == 0 and main_build.calls == 1 and other.waits == 1
    before = files(tmp_path)
    prepare_artifact(FakeAccelerator(main=False), folder, FINGERPRINT, never)  # reused: reads only
    assert never.calls == 0 and files(tmp_path) == before


def test_another_process_finding_nothing_after_the_barrier_fails_without_writing(tmp_path):
    never = Builder()
    with pytest.raises(FileNotFoundError, match="the main process prepared no artifact"):
        prepare_artifact(FakeAccelerator(main=False), tmp_path / "stage" / "pairs", FINGERPRINT, never)
    assert never.calls == 0 and list(tmp_path.iterdir()) == []


def test_a_mismatch_is_refused_on_every_process_before_the_barrier(tmp_path):
    prepare_artifact(FakeAccelerator(), tmp_path / "a", FINGERPRINT, Builder())
    other = FakeAccelerator(main=False)
    with pytest.raises(ArtifactMismatch):
        prepare_artifact(other, tmp_path / "a", {**FINGERPRINT, "k": 8}, Builder())
    assert other.waits == 0  # no process is left waiting for one that stopped


def test_building_leaves_the_global_random_state_as_it_was(tmp_path):
    def draws(tmp, bar):
        torch.manual_seed(123)  # as on-policy sampling does
        (tmp / "x.pt").write_bytes(torch.rand(3).numpy().tobytes())

    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    prepare_artifact(FakeAccelerator(), tmp_path / "a", FINGERPRINT, draws)
    assert torch.equal(torch.random.get_rng_state(), state)  # a reused artifact trains as a fresh one


def test_the_stage_context_names_artifacts_and_fingerprints(tmp_path):
    earlier = tmp_path / "mimic"
    (earlier / "final").mkdir(parents=True)
    ctx = StageContext(tmp_path, tmp_path / "pref", {"mimic": earlier / "final"}, True, {"mimic": "abc"})
    assert ctx.artifact("on_policy_pairs") == tmp_path / "pref" / "on_policy_pairs"
    with pytest.raises(FileNotFoundError, match="stage 'mimic' prepared none"):
        ctx.artifact("teacher_topk", stage="mimic")
    with pytest.raises(FileNotFoundError, match="'teacher' is no earlier stage"):
        ctx.artifact("teacher_topk", stage="teacher")
    prepare_artifact(FakeAccelerator(), earlier / "teacher_topk", FINGERPRINT, Builder())
    assert ctx.artifact("teacher_topk", stage="mimic") == earlier / "teacher_topk"

    assert ctx.fingerprint("mimic") == "stage:abc"  # an earlier stage: what its DONE records
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    stamp = ctx.fingerprint(str(folder))
    assert stamp.startswith("files:") and ctx.fingerprint(str(folder)) == stamp
    os.utime(folder / "model.safetensors", ns=(1, 1))  # rewritten
    assert ctx.fingerprint(str(folder)) != stamp


class Recorder(TrainingTask):
    """A stage that trains nothing and records the order of the runner's calls."""

    trains = False
    calls: list = []

    def __init__(self, ctx):
        super().__init__(None, ctx, None, None, None)

    def prepare(self, accelerator) -> None:
        self.calls.append(("prepare", accelerator.is_main_process, dict(self.ctx.stage_fingerprints)))

    def run(self, accelerator) -> dict[str, float]:
        self.calls.append(("run",))
        return {}

    def save_pretrained(self, out_dir: Path) -> None:
        (out_dir / "weights.bin").write_bytes(b"w")


def test_the_runner_calls_prepare_on_the_built_task_before_its_work(tmp_path, monkeypatch):
    Recorder.calls = []
    monkeypatch.setattr(runner, "build_task", lambda stage, index, ctx: Recorder(ctx))
    stage = from_dict(StageConfig, {"name": "filter", "task": "pool_filter"}, "stage")
    lineage = {"upstream": {"teacher": "abc", "old": None}, "data_files": {}}
    runner.run_stage(stage, 0, tmp_path, {"teacher": tmp_path / "teacher" / "final"}, lineage)
    assert Recorder.calls == [("prepare", True, {"teacher": "abc"}), ("run",)]
    assert (tmp_path / "filter" / "DONE").is_file()


def test_a_stale_stage_that_runs_again_drops_its_prepared_artifacts(tmp_path):
    """Retraining an upstream stage makes this one stale: the runner clears it, artifacts included (they
    were prepared from the old inputs and would be refused), and keeps what is not its own."""
    from mmfactory.runner import _clear_stage

    stage = tmp_path / "stage"
    (stage / "final").mkdir(parents=True)
    (stage / "DONE").write_text("{}")
    (stage / "teacher_topk").mkdir()
    (stage / "teacher_topk" / "fingerprint.json").write_text("{}")
    (stage / "examples").mkdir()
    _clear_stage(stage)
    assert sorted(p.name for p in stage.iterdir()) == ["examples"]
