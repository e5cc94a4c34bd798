"""LLaVA-MoD tasks: mimic distillation (losses against full-logit references, kd_only / kd_lm, the frozen
teacher, the vocabulary check, upcycling at stage start, the stored teacher top-k) and preference
distillation with the teacher as the reference (DPO / KTO-pair against separate forwards, MoE aux of chosen
and rejected)."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken

from mmfactory.artifacts import ArtifactMismatch
from mmfactory.config import ConfigError, StageConfig, from_dict
from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.data.world_source import world_object_mentions
from mmfactory.llava_mod import on_policy as on_policy_module
from mmfactory.llava_mod.on_policy import judge_reply
from mmfactory.losses.distill import forward_kl, generalized_jsd, reverse_kl, shift_for_next_token
from mmfactory.losses.lm import causal_lm_loss
from mmfactory.losses.moe_aux import moe_aux_losses
from mmfactory.losses.preference import dpo_loss, kto_pair_loss, sequence_logprobs
from mmfactory.models.components.moe import moe_blocks, moe_param_counts
from mmfactory.models.mllm import MultimodalLM
from mmfactory.tasks import build_task
from mmfactory.tasks.base import StageContext
from mmfactory.world import World
from tests.helpers import TINY_LM, world_data
from tests.models.test_mllm import TINY_VISION, tiny_mllm

DATA = world_data(["vqa", "captions"], 6, 2, image_size=16)
EVAL = {"eval": {"vqa": 0, "pope": 0, "captions": 0}}
ONE_PROCESS = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)  # for task.prepare


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A saved teacher: the tiny MLLM with a different seed than the students."""
    folder = tmp_path_factory.mktemp("teacher")
    model, tokenizer, image_processor = tiny_mllm(seed=1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def stage(task: str, options: dict, data: dict | None = None, **overrides) -> StageConfig:
    raw = {
        "name": "distill",
        "task": task,
        "model": {"vision": {"tiny": TINY_VISION}, "lm": {"tiny": dict(TINY_LM)}},
        "data": data or DATA,
        "options": {**EVAL, **options},
        **overrides,
    }
    return from_dict(StageConfig, raw, "stage")


def mimic(tmp_path, teacher_dir, **options):
    torch.manual_seed(0)
    return build_task(
        stage("mllm_mimic_distill", {"teacher": str(teacher_dir), **options}),
        0,
        StageContext(tmp_path, tmp_path / "distill"),
    )


def trainable(task) -> list[torch.nn.Parameter]:
    return [p for name, p in task.named_parameters() if name.startswith("model.") and p.requires_grad]


def assert_same_gradients(loss, reference, params, **tolerance) -> None:
    grad = partial(torch.autograd.grad, inputs=params, allow_unused=True)  # the tower's last layer is unused
    for got, want in zip(grad(loss, retain_graph=True), grad(reference), strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, **tolerance)


def full_logits(model, batch) -> torch.Tensor:
    return model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits


@pytest.mark.parametrize(
    ("options", "divergence"),
    [
        ({"mode": "kd_only"}, partial(forward_kl)),
        ({"mode": "kd_lm", "kd_weight": 0.7, "lm_weight": 0.3}, partial(forward_kl)),
        (
            {"mode": "kd_only", "divergence": "reverse_kl", "temperature": 2.0},
            partial(reverse_kl, temperature=2.0),
        ),
        ({"mode": "kd_only", "divergence": "jsd", "jsd_beta": 0.3}, partial(generalized_jsd, beta=0.3)),
    ],
)
def test_mimic_loss_equals_the_full_logit_reference_in_value_and_gradient(
    tmp_path, teacher_dir, options, divergence
):
    task = mimic(tmp_path, teacher_dir, **options)
    batch = task.collate([task.train_dataset()[i] for i in (0, 3, 5)])
    out = task(batch)

    # Reference: every position projected, shifted by hand, the teacher from its own folder.
    teacher = MultimodalLM.from_pretrained(teacher_dir).eval()
    student_logits, mask = shift_for_next_token(full_logits(task.model, batch), batch["labels"])
    with torch.no_grad():
        teacher_logits = full_logits(teacher, batch)[:, :-1]
    kd = divergence(student_logits, teacher_logits, mask)
    ce = causal_lm_loss(full_logits(task.model, batch), batch["labels"])[0]
    o = task.options
    reference = o.kd_weight * kd + (o.lm_weight * ce if o.mode == "kd_lm" else 0)
    torch.testing.assert_close(out["kd"], kd.detach())
    torch.testing.assert_close(out["loss"], reference)
    assert_same_gradients(out["loss"], reference, trainable(task))


def test_the_teacher_stays_frozen_in_eval_mode_while_the_student_learns(tmp_path, teacher_dir):
    task = mimic(tmp_path, teacher_dir, mode="kd_lm")
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in task.model.language_model.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable(task), lr=1e-2)
    task.train()
    assert not task.teacher.training and task.model.training
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = task(batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad and p.grad is None for p in task.teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in task.teacher.state_dict().items())
    assert any(
        not torch.equal(v, student_before[k]) for k, v in task.model.language_model.state_dict().items()
    )


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    model, tokenizer, image_processor = tiny_mllm(seed=1)
    tokenizer.add_tokens([AddedToken("<extra>", special=True)], special_tokens=True)
    model.language_model.resize_token_embeddings(len(tokenizer))
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="tokenizer .* differs from the student's"):
        mimic(tmp_path, tmp_path / "teacher")


def test_a_teacher_that_sees_other_image_tokens_is_refused(tmp_path):
    model, tokenizer, image_processor = tiny_mllm(seed=1, vision={**TINY_VISION, "patch_size": 4})
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="sees images as 16 tokens"):
        mimic(tmp_path, tmp_path / "teacher")


def test_upcycling_at_stage_start_keeps_the_outputs_and_counts_the_aux_loss_once(tmp_path, teacher_dir):
    dense = mimic(tmp_path, teacher_dir, mode="kd_lm", moe={"aux_weight": 0.0})
    sparse = mimic(
        tmp_path, teacher_dir, mode="kd_lm", upcycle={"num_experts": 4, "top_k": 2, "layers": "sparse"}
    )
    assert len(moe_blocks(sparse.model)) == 1  # TINY_LM has 2 layers: MoE in layer 0
    counts = moe_param_counts(sparse.model)
    assert counts["total"] > counts["activated"] > moe_param_counts(dense.model)["total"]
    batch = dense.collate([dense.train_dataset()[i] for i in range(3)])
    out_dense, out_sparse = dense(batch), sparse(batch)
    torch.testing.assert_close(out_sparse["kd"], out_dense["kd"])  # upcycled experts: the same function
    aux = moe_aux_losses(sparse.model.language_model, batch["attention_mask"])["load_balancing"]
    torch.testing.assert_close(out_sparse["loss"], out_dense["loss"] + 0.01 * aux)
    assert aux > 0

    sparse.save_pretrained(tmp_path / "final")  # reloads as an MoE MLLM with equal logits
    loaded = MultimodalLM.from_pretrained(tmp_path / "final")
    assert len(moe_blocks(loaded)) == 1
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(full_logits(loaded, batch), full_logits(sparse.model, batch))


def test_distilling_from_the_stored_full_top_k_matches_the_online_teacher(tmp_path, teacher_dir):
    vocab = MultimodalLM.from_pretrained(teacher_dir).language_model.config.vocab_size
    online = mimic(tmp_path, teacher_dir, mode="kd_only")
    stored = mimic(tmp_path / "b", teacher_dir, mode="kd_only", teacher_topk=vocab, teacher_topk_batch_size=4)
    stored.prepare(ONE_PROCESS)  # computes the cache
    dataset = stored.train_dataset()
    assert stored.teacher is None and stored.eval_dataset() is None  # never held in memory while training
    cache = tmp_path / "b" / "distill" / "teacher_topk"
    assert (cache / "index.json").is_file() and len(list(cache.glob("*.safetensors"))) == 1
    batch = stored.collate([dataset[i] for i in (1, 2, 4)])
    reference = online.collate([online.train_dataset()[i] for i in (1, 2, 4)])
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert batch["teacher_logprobs"].shape == (int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), vocab)
    torch.testing.assert_close(
        stored(batch)["kd"], online(reference)["kd"], atol=2e-3, rtol=1e-3
    )  # fp16 storage

    stamp = (cache / "index.json").stat().st_mtime_ns
    again = mimic(tmp_path / "b", teacher_dir, mode="kd_only", teacher_topk=vocab)
    again.prepare(ONE_PROCESS)
    again.train_dataset()
    assert (cache / "index.json").stat().st_mtime_ns == stamp  # reused, not recomputed
    other = mimic(tmp_path / "b", teacher_dir, mode="kd_only", teacher_topk=8)
    with pytest.raises(ArtifactMismatch, match="prepared from another k"):
        other.prepare(ONE_PROCESS)


def test_a_stored_top_k_supports_only_forward_kl(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="forward_kl"):
        mimic(tmp_path, teacher_dir, divergence="reverse_kl", teacher_topk=4)


def test_distillation_refuses_a_per_sample_loss_reduction_it_would_ignore(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="loss_reduction: the mimic loss averages over tokens"):
        mimic(tmp_path, teacher_dir, loss_reduction="sample")
    with pytest.raises(ConfigError, match="loss_reduction: unknown key"):  # preference losses are per pair
        preference(tmp_path, teacher_dir, loss_reduction="sample")


# -- preference distillation ---------------------------------------------------------------------------


def preference(tmp_path, teacher_dir, **options):
    torch.manual_seed(0)
    data = world_data(["preference"], 6, 2, image_size=16)
    return build_task(
        stage("mllm_preference_distill", {"teacher": str(teacher_dir), **options}, data),
        0,
        StageContext(tmp_path, tmp_path / "pref"),
    )


@pytest.mark.parametrize("loss", ["sigmoid", "kto_pair"])
def test_preference_loss_uses_the_teacher_as_reference(tmp_path, teacher_dir, loss):
    task = preference(tmp_path, teacher_dir, dpo={"loss": loss, "beta": 0.2})
    pairs = task.train_dataset()
    batch = task.collate(pairs[:3])
    out = task(batch)

    teacher = MultimodalLM.from_pretrained(teacher_dir).eval()
    chosen = task.processor.collate([p[0] for p in pairs[:3]])
    rejected = task.processor.collate([p[1] for p in pairs[:3]])
    policy = [sequence_logprobs(full_logits(task.model, b), b["labels"])[0] for b in (chosen, rejected)]
    with torch.no_grad():
        ref = [sequence_logprobs(full_logits(teacher, b), b["labels"])[0] for b in (chosen, rejected)]
    fn = dpo_loss if loss == "sigmoid" else kto_pair_loss
    reference = fn(policy[0], policy[1], ref[0], ref[1], 0.2)[0]
    torch.testing.assert_close(out["loss"], reference, rtol=1e-5, atol=1e-6)
    assert_same_gradients(out["loss"], reference, trainable(task), rtol=1e-4, atol=1e-6)


def test_preference_adds_the_moe_aux_of_chosen_and_rejected(tmp_path, teacher_dir):
    task = mimic(tmp_path, teacher_dir, upcycle={"layers": [1]})
    task.save_pretrained(tmp_path / "moe")
    pref = build_task(
        stage(
            "mllm_preference_distill",
            {"teacher": str(teacher_dir), "moe": {"aux_weight": 0.5}},
            world_data(["preference"], 4, 0, image_size=16),
            model={},
            init_from=str(tmp_path / "moe"),
        ),
        0,
        StageContext(tmp_path, tmp_path / "pref"),
    )
    batch = pref.collate(pref.train_dataset()[:2])
    out = pref(batch)
    aux = []
    for half in (slice(0, 2), slice(2, 4)):
        pref.model(batch["input_ids"][half], batch["pixel_values"][half], batch["attention_mask"][half])
        aux.append(moe_aux_losses(pref.model.language_model, batch["attention_mask"][half])["load_balancing"])
    torch.testing.assert_close(out["load_balancing"], (aux[0] + aux[1]).detach())
    pref.options.moe.aux_weight = 0.0
    torch.testing.assert_close(pref(batch)["loss"] + 0.5 * (aux[0] + aux[1]), out["loss"])


def test_judge_reply_scores_answers_and_object_hallucination():
    judge = partial(judge_reply, mentions=world_object_mentions)
    assert judge("Two.", "2") == 1.0 and judge("3", "2") == 0.0  # a truth naming no object: a short answer
    truth = "A red star and a blue circle."
    assert judge("A blue circle and a red star.", truth) == 1.0
    assert judge("A red star.", truth) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert judge("A red star and a green ring.", truth) == pytest.approx(0.5)
    assert judge("Nothing to see.", truth) == 0.0


def test_sampled_pairs_reject_the_worst_sample_and_prefer_the_truth_over_imperfect_ones(
    tmp_path, teacher_dir, monkeypatch
):
    prompts = world_data(["vqa", "captions"], 3, 0, image_size=16)["train"]
    on_policy = {"samples_per_prompt": 3, "max_new_tokens": 6}
    data = {"train": [], "eval": [], "prompts": prompts, "on_policy": on_policy}
    task = build_task(
        stage("mllm_preference_distill", {"teacher": str(teacher_dir)}, data),
        0,
        StageContext(tmp_path, tmp_path / "pref"),
    )
    scripted = iter([["2", "red", "no", "A red star.", "x", "y"], ["3", "blue", "no", "z", "x", "y"]] * 2)
    replies = {}

    def fake_generate(model, processor, conversations, images, cfg):
        assert cfg.do_sample and len(conversations) == 6
        out = next(scripted, ["x"] * 6)
        replies.setdefault("rounds", []).append(out)
        return out

    monkeypatch.setattr(on_policy_module, "generate_multimodal_replies", fake_generate)
    task.prepare(ONE_PROCESS)  # samples and judges the pairs
    pairs = task.pairs("train")
    assert len(replies["rounds"]) == 3
    world = World(seed=0, image_size=16)
    truths = [q["answer"] for q in world.vqa("train", 3)] + [
        c["text"] for c in world.pairs("train", 3, "en", "brief")
    ]
    expected = []
    for i, truth in enumerate(truths):
        samples = [r[i] for r in replies["rounds"]]
        scores = [judge_reply(s, truth, world_object_mentions) for s in samples]
        if min(scores) == 1.0:
            continue
        best = samples[scores.index(max(scores))] if max(scores) == 1.0 else truth
        expected.append((best, samples[scores.index(min(scores))]))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == expected and expected
    assert all(p["prompt"].startswith("<image>\n") and p["image"] is not None for p in pairs)
    assert task.counts["train/sampled_replies"] == 18
