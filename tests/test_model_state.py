"""Learning, transfer, generation and RoI matching leave the model as they found it: the same attention processors,
vocabulary, embedding module and rows, weights and ``requires_grad`` flags, so no caller reloads a model to get a
clean one; a concept applied for a ``with`` block is gone after it, also when the block fails."""

import pytest
import torch
from conftest import random_image, square_mask

from clic.concept import applied_concept
from clic.config import GenerateConfig, MatchConfig, TransferConfig, learn_config
from clic.generate import generate
from clic.learn import learn
from clic.roi import auto_target_mask, learn_matcher
from clic.transfer import transfer


def _state(backbone) -> dict:
    text = backbone.text_encoder
    return {
        "processors": dict(backbone.unet.attn_processors),
        "vocabulary": (len(backbone.tokenizer), backbone.tokenizer.get_vocab()),
        "embedding": text.get_input_embeddings(),
        "requires_grad": {name: p.requires_grad for m in (backbone.unet, text, backbone.vae)
                          for name, p in m.named_parameters()},
        "weights": {name: v.clone() for m in (backbone.unet, text) for name, v in m.state_dict().items()},
    }


def _assert_same(backbone, before: dict) -> None:
    after = _state(backbone)
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items()), "processors changed"
    assert after["vocabulary"] == before["vocabulary"], "tokens were left in the tokenizer"
    assert after["embedding"] is before["embedding"], "the embedding module was replaced"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())
    assert backbone.tokenize("a photo of <v*>")[0, 4] != len(backbone.tokenizer)          # <v*> is no token


def test_learn_transfer_generate_leave_the_model_as_found(backbone):
    before = _state(backbone)
    result = learn(backbone, [random_image()], [square_mask()],
                   learn_config(steps=2, object_class="chair", lr=1e-3), progress=False)
    _assert_same(backbone, before)
    concept = result.concept
    transfer(backbone, concept, random_image(seed=1), square_mask(), TransferConfig(steps=3, t_start=0),
             progress=False)
    _assert_same(backbone, before)
    generate(backbone, concept, GenerateConfig(steps=2, base_steps=1), progress=False)
    _assert_same(backbone, before)
    matcher = learn_matcher(backbone, concept, random_image(), square_mask(), MatchConfig(steps=2), progress=False)
    _assert_same(backbone, before)
    auto_target_mask(backbone, matcher, random_image(seed=2))
    _assert_same(backbone, before)
    # a second run on the same model learns what a run on a fresh one learns
    again = learn(backbone, [random_image()], [square_mask()],
                  learn_config(steps=2, object_class="chair", lr=1e-3), progress=False)
    assert again.concept.tokens == concept.tokens and torch.equal(again.concept.embeddings, concept.embeddings)


def test_applied_concept_is_gone_after_the_block_also_on_error(backbone, concept):
    before = _state(backbone)
    with pytest.raises(RuntimeError):
        with applied_concept(backbone, concept, train="kv", train_token=True) as applied:
            assert len(backbone.tokenizer) == before["vocabulary"][0] + 1
            assert applied.token_rows.requires_grad and all(p.requires_grad for p in applied.attention_parameters)
            with applied_concept(backbone, concept):           # the same concept again, inside: its rows refreshed
                assert len(backbone.tokenizer) == before["vocabulary"][0] + 1
            raise RuntimeError("a failing step")
    _assert_same(backbone, before)
