"""A concept in stock diffusers pipelines (clic.stock): the same image as clic's own generation, any number of
tokens, K/V and K/V/Q/out, the three pipeline classes, the export folder, and a guard against a load that silently
leaves the trained K/V out (diffusers' documented ``load_attn_procs``)."""

import glob

import pytest
import torch
from conftest import random_image, square_mask

from clic.concept import Concept
from clic.config import learn_config
from clic.errors import ConceptFileError
from clic.generate import GenerateConfig, generate
from clic.learn import learn
from clic.stock import EMBEDS, META, WEIGHTS, export_diffusers, load_concept, read_export, unload_concept

STEPS = 6


def strong(concept: Concept, seed: int = 0, scale: float = 0.5) -> Concept:
    """The concept with its trained matrices moved well away from the base model's: a few learning steps on a random
    model barely change them, and a test of whether they were loaded needs them to matter."""
    g = torch.Generator().manual_seed(seed)
    weights = {k: w + scale * w.std() * torch.randn(w.shape, generator=g) for k, w in concept.attn_weights.items()}
    return Concept(concept.tokens, concept.embeddings, weights, concept.meta)


def stock(model_dir, cls="StableDiffusionPipeline"):
    """A stock pipeline with the paper's sampler, as clic samples (DDIM without clipping x_0)."""
    import diffusers
    from diffusers import DDIMScheduler

    pipe = getattr(diffusers, cls).from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, prompt, seed=5, steps=STEPS):
    return pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture(scope="module")
def kv_concept(concept_path):
    return strong(Concept.load(concept_path))


@pytest.fixture(scope="module")
def two_token_concept(tiny_model_dir):
    """<v1*> and <v2*> from two masks on one image, with K/V/Q/out (the official recipe's trained set)."""
    from conftest import shared_backbone

    masks = torch.cat([square_mask(), square_mask(box=(40, 56, 8, 24))])
    cfg = learn_config(steps=2, object_class="chair", train="kv+q+out", lr=1e-3)
    return strong(learn(shared_backbone(tiny_model_dir), [random_image()], [masks], cfg, progress=False).concept, 1)


def test_stock_pipeline_gives_clic_generation(tiny_model_dir, backbone, kv_concept, tmp_path):
    """Equal settings: the ddim sampler without clipping, the same seed, no base-model stage (t_s = 0, `clic generate
    --base-steps 0`), the same prompt and CFG scale."""
    ours = generate(backbone, kv_concept, GenerateConfig(steps=STEPS, base_steps=0, seeds=(5,)), progress=False)
    pipe = stock(tiny_model_dir)
    assert load_concept(pipe, kv_concept) == ["<v*>"]
    theirs = latents(pipe, ours.prompt)
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-5, atol=1e-5)
    image = pipe(prompt=ours.prompt, num_inference_steps=STEPS, output_type="pt",
                 generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close((ours.images + 1) / 2, image, rtol=1e-4, atol=1e-4)

    # the K/V matter: the token alone (what a load that skips the processors gives) is far from it
    token_only = stock(tiny_model_dir)
    token_only.load_textual_inversion(list(kv_concept.embeddings), token=list(kv_concept.tokens))
    assert (latents(token_only, ours.prompt) - theirs).abs().max() > 100 * 1e-5

    # and out again: the plain pipeline's image
    unload_concept(pipe)
    plain = stock(tiny_model_dir)
    torch.testing.assert_close(latents(pipe, "a photo of a chair"), latents(plain, "a photo of a chair"))


def test_several_tokens_and_q_out_round_trip(tiny_model_dir, backbone, two_token_concept, tmp_path):
    concept = two_token_concept
    assert concept.tokens == ["<v1*>", "<v2*>"] and concept.trains_q_out
    folder = export_diffusers(concept, tmp_path / "export", backbone)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [WEIGHTS, META, "learned_embeds_1.safetensors", "learned_embeds_2.safetensors"])
    back = read_export(folder)
    assert back.tokens == concept.tokens and torch.equal(back.embeddings, concept.embeddings)
    assert back.attn_weights.keys() == concept.attn_weights.keys()
    assert all(torch.equal(back.attn_weights[k], concept.attn_weights[k]) for k in concept.attn_weights)

    cfg = GenerateConfig(steps=STEPS, base_steps=0, seeds=(3,))
    ours = generate(backbone, concept, cfg, progress=False)
    assert "<v1*> and <v2*>" in ours.prompt
    for source in (concept, folder):            # a Concept, or the export folder
        pipe = stock(tiny_model_dir)
        assert load_concept(pipe, source) == ["<v1*>", "<v2*>"]
        torch.testing.assert_close(ours.latents, latents(pipe, ours.prompt, seed=3), rtol=1e-5, atol=1e-5)

    # diffusers' own textual-inversion loader takes the token files (one token per file)
    pipe = stock(tiny_model_dir)
    pipe.load_textual_inversion(sorted(glob.glob(str(folder / "learned_embeds*.safetensors"))))
    assert {"<v1*>", "<v2*>"} <= set(pipe.tokenizer.get_vocab())


def test_an_export_replaces_an_earlier_one_whole(backbone, kv_concept, two_token_concept, tmp_path):
    folder = export_diffusers(two_token_concept, tmp_path / "export", backbone)
    assert export_diffusers(kv_concept, folder, backbone) == folder      # one token over two
    assert [p.name for p in tmp_path.iterdir()] == ["export"]             # no temporary folder left beside it
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, META, EMBEDS])   # <v1*>, <v2*> gone
    back = read_export(folder)
    assert back.tokens == kv_concept.tokens and torch.equal(back.embeddings, kv_concept.embeddings)


@pytest.mark.parametrize("cls", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                 "StableDiffusionInpaintPipeline"])
def test_every_stock_pipeline_class_gets_the_trained_weights(tiny_model_dir, kv_concept, cls):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    pipe = stock(tiny_model_dir, cls)
    load_concept(pipe, kv_concept)
    installed = {n: p for n, p in pipe.unet.attn_processors.items() if isinstance(p, CustomDiffusionAttnProcessor2_0)}
    assert sorted(installed) == kv_concept.layers
    for name, proc in installed.items():
        assert torch.equal(proc.to_k_custom_diffusion.weight, kv_concept.attn_weights[f"attn.{name}.to_k.weight"])
        assert torch.equal(proc.to_v_custom_diffusion.weight, kv_concept.attn_weights[f"attn.{name}.to_v.weight"])

    kw = dict(prompt="a chair with <v*> style", num_inference_steps=2, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    if cls != "StableDiffusionPipeline":
        kw.update(image=random_image()[None].add(1).div(2), strength=1.0)
    if cls == "StableDiffusionInpaintPipeline":
        kw.update(mask_image=square_mask()[None])
    with_kv = pipe(**kw).images
    token_only = stock(tiny_model_dir, cls)
    token_only.load_textual_inversion(list(kv_concept.embeddings), token=list(kv_concept.tokens))
    kw["generator"] = torch.Generator().manual_seed(0)
    assert (token_only(**kw).images - with_kv).abs().max() > 1e-3


def test_export_folder_has_the_layouts_diffusers_reads(tiny_model_dir, backbone, kv_concept, tmp_path):
    from safetensors.torch import load_file

    folder = export_diffusers(kv_concept, tmp_path / "export", backbone)
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, EMBEDS, META])
    state = load_file(str(folder / WEIGHTS))
    # unet.save_attn_procs's layout: every attention layer, an empty entry where nothing was trained
    assert {k for k, v in state.items() if v.numel() == 0} | {k.rsplit(".", 2)[0] for k in state if "custom" in k} \
        == set(backbone.unet.attn_processors)
    assert load_file(str(folder / EMBEDS)).keys() == {"<v*>"}

    # diffusers' documented loader reads the file but, in the diffusers this project pins, installs nothing without
    # its private _pipeline argument: the reason for load_concept and the README's set_attn_processor recipe. If
    # this starts failing, diffusers installs them again and the README's note can go.
    pipe = stock(tiny_model_dir)
    before = dict(pipe.unet.attn_processors)
    pipe.unet.load_attn_procs(str(folder), weight_name=WEIGHTS)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_refusals(other_tiny_model_dir, tiny_model_dir, kv_concept, tmp_path):
    with pytest.raises(ConceptFileError, match="made for base model"):
        load_concept(stock(other_tiny_model_dir), kv_concept)
    pipe = stock(tiny_model_dir)
    load_concept(pipe, kv_concept)
    with pytest.raises(ConceptFileError, match="already has the token"):
        load_concept(pipe, kv_concept)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptFileError, match="not a folder written by"):
        load_concept(pipe, tmp_path / "empty")
