"""The text-to-image LM: segment losses against a naive per-position reference (forward and gradient), the
vocabulary layout, and save/load through the same folder a stage writes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.models.t2i import TextToImageLM
from tests.mars.conftest import CODES, VOCAB, tiny_lm, tiny_t2i


def _naive_loss(model, hidden, labels):
    """Per position: the segment's log-softmax (codes for an image target, text + <img> otherwise)."""
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX or y == model.eoi:
                continue
            h = hidden[b, t]
            if VOCAB <= y < VOCAB + CODES:
                logp = torch.log_softmax(h @ model.new_head.weight[:CODES].T, -1)[y - VOCAB]
            else:
                full = torch.cat(
                    [h @ model.lm.get_output_embeddings().weight.T, h @ model.new_head.weight[CODES:].T]
                )
                logp = torch.log_softmax(full, -1)[VOCAB if y == model.boi else y]
            terms.append(-logp)
    return torch.stack(terms).mean()


def test_segment_loss_equals_the_naive_reference_forward_and_gradient():
    model = tiny_t2i().train()
    codes = VOCAB + torch.randint(0, CODES, (2, 6))
    text = torch.randint(0, VOCAB, (2, 4))
    ids = torch.cat(
        [text, torch.full((2, 1), model.boi), codes, torch.full((2, 1), model.eoi), text[:, :2]], 1
    )
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    hidden = torch.randn(*ids.shape, 32, requires_grad=True)
    out = model.loss(hidden, labels)
    expected = _naive_loss(model, hidden, labels)
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert int(out["image_tokens"]) == 12 and int(out["text_tokens"]) == 2 * (
        1 + 1 + 2
    )  # + <img>, first text
    (grad,) = torch.autograd.grad(out["loss"], hidden)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert torch.allclose(grad, expected_grad, atol=1e-6)


def test_new_ids_follow_the_text_vocabulary():
    model = tiny_t2i()
    assert (model.boi, model.eoi) == (VOCAB + CODES, VOCAB + CODES + 1)
    ids = torch.tensor([[3, VOCAB + 2, model.boi]])
    emb = model.embed(ids)
    assert torch.equal(emb[0, 0], model.lm.get_input_embeddings().weight[3])
    assert torch.equal(emb[0, 1], model.new_embed.weight[2])
    assert torch.equal(emb[0, 2], model.new_embed.weight[CODES])


@pytest.mark.parametrize("experts", ["semvie", "none"])
def test_save_and_load_round_trip(tmp_path, experts):
    model = tiny_t2i(experts=experts)
    model.save(tmp_path / "m")
    again = TextToImageLM.load(tmp_path / "m")
    ids = torch.cat([torch.randint(0, VOCAB, (2, 4)), VOCAB + torch.randint(0, CODES, (2, 5))], 1)
    assert torch.equal(model(ids)[0], again(ids)[0])
    with pytest.raises(ValueError, match="cannot continue"):
        TextToImageLM.load(tmp_path / "m", experts="none" if experts == "semvie" else "semvie")


def test_a_semvie_folder_keeps_the_frozen_lm_loadable_as_itself(tmp_path):
    reference = tiny_lm()
    tiny_t2i().save(tmp_path / "m")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "lm")
    for (name, a), (_, b) in zip(reference.state_dict().items(), lm.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
