"""The paper recipe (and the baselines that share its loop) compute what they computed before the official recipe's
options were added: learning losses, learned weights and transfer latents, recorded in data/recipes_before.json by
the same computation on the code before that change. Bit for bit where the record was made (same torch, same CPU
instruction set); elsewhere float rounding may differ, and the values are compared to 1e-5."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import random_image, shared_backbone, square_mask

from clic.config import learn_config, transfer_config
from clic.learn import learn
from clic.transfer import transfer

RECORD = json.loads((Path(__file__).parent / "data" / "recipes_before.json").read_text())
EXACT = RECORD["torch"] == torch.__version__ and RECORD["cpu"] == torch.backends.cpu.get_cpu_capability()

LEARN = {
    "paper": ("paper", dict(steps=3, lr=1e-3, seed=2), [square_mask()]),
    "paper-two-tokens": ("paper", dict(steps=2, lr=1e-3, seed=5),
                         [torch.cat([square_mask(box=(4, 20, 4, 28)), square_mask(box=(36, 60, 30, 60))])]),
    "custom-diffusion": ("custom-diffusion", dict(steps=2, lr=1e-3, seed=1), [square_mask()]),
    "break-a-scene": ("break-a-scene", dict(steps=2, lr=1e-3, seed=1, token_warmup_steps=1, attn_factor=2),
                      [square_mask()]),
}
TRANSFER = {
    "paper": dict(steps=10, t_start=2, seeds=(3, 4), batch_size=2),
    "paper-eta-ddim1": dict(steps=10, t_start=2, seeds=(5,), ddim_eta=1.0, eta=20.0, guidance_range=(2, 6)),
    "paper-euler-ancestral": dict(steps=10, t_start=3, seeds=(6,), scheduler="euler-ancestral"),
    "paper-area-blend": dict(steps=8, t_start=1, seeds=(7,), blend_mask="area", guidance_target="ones"),
}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def _concept_digest(concept) -> str:
    h = hashlib.sha256(concept.embeddings.numpy().tobytes())
    for k in sorted(concept.attn_weights):
        h.update(concept.attn_weights[k].numpy().tobytes())
    return h.hexdigest()[:16]


def _same(got, want):
    if EXACT:
        assert got == want
    else:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7, nan_ok=True)


@pytest.fixture(scope="module")
def learned(tiny_model_dir):
    backbone = shared_backbone(tiny_model_dir)
    out = {}
    for name, (recipe, kw, masks) in LEARN.items():
        out[name] = learn(backbone, [random_image()], masks, learn_config(recipe, object_class="chair", **kw),
                          progress=False)
    return out


@pytest.mark.parametrize("name", list(LEARN))
def test_learning_is_unchanged(learned, name):
    want = RECORD[f"learn/{name}"]
    got = learned[name]
    assert [r["t"] for r in got.history] == [r["t"] for r in want["history"]]
    for g, w in zip(got.history, want["history"]):
        for key in ("loss", "l_con", "l_att", "l_roi"):
            _same(g[key], w[key])
    if EXACT:
        assert _concept_digest(got.concept) == want["concept"]


@pytest.mark.parametrize("name", list(TRANSFER))
def test_transfer_is_unchanged(tiny_model_dir, learned, name):
    result = transfer(shared_backbone(tiny_model_dir), learned["paper"].concept, random_image(seed=1), square_mask(),
                      transfer_config("paper", **TRANSFER[name]), progress=False)
    want = RECORD[f"transfer/{name}"]
    unguided = [x != x for x in want["guidance_loss"]]                        # nan: not a guided step
    assert [x != x for x in result.guidance_loss.flatten().tolist()] == unguided
    _same([x for x, skip in zip(result.guidance_loss.flatten().tolist(), unguided) if not skip],
          [x for x, skip in zip(want["guidance_loss"], unguided) if not skip])
    _same(float(result.latents.double().sum()), want["latents_sum"])
    if EXACT:
        assert _digest(result.latents) == want["latents"] and _digest(result.images) == want["images"]
