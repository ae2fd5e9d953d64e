"""Concept files: round trip, base-model check, corrupt files (the stock-diffusers export: test_stock.py)."""

import pytest
import torch
from conftest import random_image, square_mask

from clic.concept import Concept
from clic.errors import ConceptFileError
from clic.config import learn_config as make_config
from clic.learn import learn
from clic.models import load_backbone


@pytest.fixture(scope="module")
def concept_file(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("concept") / "c.safetensors"
    backbone = load_backbone(tiny_model_dir, device="cpu")
    learn(backbone, [random_image()], [square_mask()], make_config(steps=3, object_class="chair", lr=1e-2),
          out_path=out, progress=False)
    return out


def test_save_load_round_trip(concept_file, tmp_path):
    a = Concept.load(concept_file)
    a.save(tmp_path / "b.safetensors")
    b = Concept.load(tmp_path / "b.safetensors")
    assert a.tokens == b.tokens == ["<v*>"]
    assert torch.equal(a.embeddings, b.embeddings)
    assert a.attn_weights.keys() == b.attn_weights.keys()
    assert all(torch.equal(a.attn_weights[k], b.attn_weights[k]) for k in a.attn_weights)
    assert a.meta == b.meta
    # only what was learned is stored: token + 7 layers x (K, V), no base weights
    assert len(a.attn_weights) == 14
    assert a.meta["object_class"] == "chair" and a.meta["prompt"] == "a chair with <v*> style"


def test_apply_restores_the_trained_weights(concept_file, tiny_model_dir):
    concept = Concept.load(concept_file)
    backbone = load_backbone(tiny_model_dir, device="cpu")
    procs = concept.apply(backbone)
    for key, value in concept.attn_weights.items():
        layer = key[len("attn."):].rsplit(".to_", 1)[0]
        sub = "to_k" if ".to_k." in key else "to_v"
        assert torch.equal(getattr(procs[layer], sub).weight, value)
    ids = backbone.tokenize("a photo of <v*>")
    assert int(ids[0, 4]) == 49408


def test_concept_for_other_weights_is_refused(concept_file, other_tiny_model_dir):
    backbone = load_backbone(other_tiny_model_dir, device="cpu")
    with pytest.raises(ConceptFileError, match="weights differ"):
        Concept.load(concept_file).apply(backbone)


def test_concept_for_other_architecture_is_refused(concept_file, tiny_sd2_model_dir):
    backbone = load_backbone(tiny_sd2_model_dir, device="cpu")
    with pytest.raises(ConceptFileError, match="was made for base model"):
        Concept.load(concept_file).apply(backbone)


def test_truncated_and_foreign_files_are_refused(concept_file, tmp_path):
    data = concept_file.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConceptFileError, match="not a valid safetensors"):
        Concept.load(tmp_path / "trunc.safetensors")
    import pickle

    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ConceptFileError, match="not a valid safetensors"):
        Concept.load(tmp_path / "pickle.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConceptFileError, match="without clic concept metadata"):
        Concept.load(tmp_path / "other.safetensors")
    with pytest.raises(ConceptFileError, match="not found"):
        Concept.load(tmp_path / "missing.safetensors")
