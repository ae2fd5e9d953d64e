"""SDXL on the tiny-sdxl model: the text side as the stock pipeline computes it, the placeholder in both text encoders,
SD1's mechanism tests (captured columns vs the full softmax, the trainable set, resume), transfer and generation
against the stock SDXL pipelines (img2img, inpainting with a 4-channel UNet, text-to-image with the exported
concept), RoI matching and discovery, the command line."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image, shared_backbone, square_mask
from test_attention import _full_softmax_maps

from clic.attention import ClicCrossAttnProcessor, capture_token_maps, cross_attention_layers, install_processors
from clic.cli import main
from clic.concept import Concept, applied_concept
from clic.config import DiscoverConfig, GenerateConfig, MatchConfig, TransferConfig, learn_config
from clic.errors import ConceptFileError
from clic.generate import generate
from clic.learn import learn
from clic.models import SDXLBackbone, load_backbone
from clic.roi import auto_target_mask, discover, learn_matcher
from clic.sampling import encode_prompt
from clic.stock import export_diffusers, load_concept, read_export, unload_concept
from clic.tokens import initializer_embedding
from clic.transfer import transfer

STEPS = 8
PROMPT = "a chair with <v*> style"


@pytest.fixture(scope="module")
def xl_concept_path(tiny_sdxl_model_dir, tmp_path_factory):
    """A concept learned for 3 steps on tiny-sdxl (lr 1e-3: it changes the images measurably)."""
    path = tmp_path_factory.mktemp("sdxl") / "chair.safetensors"
    learn(shared_backbone(tiny_sdxl_model_dir), [random_image()], [square_mask()],
          learn_config(steps=3, lr=1e-3, object_class="chair"), out_path=path, progress=False)
    return path


@pytest.fixture(scope="module")
def stock(tiny_sdxl_model_dir, xl_concept_path, tmp_path_factory):
    """A stock StableDiffusionXLPipeline (DDIM) loaded from the folder, with the exported concept loaded by diffusers'
    own classes."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    export = tmp_path_factory.mktemp("sdxl-export")
    export_diffusers(Concept.load(xl_concept_path), export, shared_backbone(tiny_sdxl_model_dir))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    load_concept(pipe, export)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline(cls, stock):
    from diffusers import DDIMScheduler

    pipe = cls(**{k: v for k, v in stock.components.items() if k != "scheduler"},
               scheduler=DDIMScheduler.from_config(stock.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- the text side


def test_text_conditioning_is_the_stock_pipelines(sdxl_backbone):
    from diffusers import StableDiffusionXLPipeline

    xl = sdxl_backbone
    assert isinstance(xl, SDXLBackbone) and xl.resolution == 64 and xl.embedding_dims == [32, 48]
    pipe = StableDiffusionXLPipeline(vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2,
                                     tokenizer=xl.tokenizer, tokenizer_2=xl.tokenizer_2, unet=xl.unet,
                                     scheduler=xl.sampling_scheduler("ddim"))
    for negative in (None, "blurry"):        # None: zeros (force_zeros_for_empty_prompt), as ours for ""
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a photo of a chair", device="cpu",
                                                             negative_prompt=negative)
        ours = encode_prompt(xl, "a photo of a chair", negative or "", 1, True)
        assert ours.hidden.shape == (2, 77, 80) and ours.pooled.shape == (2, 32)
        torch.testing.assert_close(ours.hidden, torch.cat([neg, embeds]), rtol=0, atol=0)
        torch.testing.assert_close(ours.pooled, torch.cat([neg_pooled, pooled]), rtol=0, atol=0)
    assert not neg.eq(0).all() and ours.hidden[0].ne(0).any()
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32,
                                      xl.text_encoder_2.config.projection_dim)
    assert torch.equal(ours.time_ids, time_ids)
    kwargs = ours.unet_kwargs()
    assert kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    # the time ids are made once per device and dtype: every encoding hands on the same tensor
    with torch.no_grad():
        assert xl.encode_text(xl.tokenize("a chair")).time_ids is xl.encode_text(xl.tokenize("a vase")).time_ids


def test_placeholder_is_in_both_encoders_and_pooling_is_at_the_end_token(sdxl_backbone):
    xl = sdxl_backbone
    sizes = [len(t) for t in xl.tokenizers]
    start = Concept.untrained(["<v*>"], initializer_embedding(xl, "pattern")[None])
    assert start.embeddings.shape == (1, 80)
    with applied_concept(xl, start, train="kv", train_token=True) as applied:
        assert [t.convert_tokens_to_ids("<v*>") for t in xl.tokenizers] == [49408, 49408]
        assert len(applied.token_parameters) == 2 and all(p.requires_grad for p in applied.token_parameters)
        torch.testing.assert_close(applied.token_rows, start.embeddings)
        ids = xl.tokenize("a <v*> chair")
        assert ids.shape == (1, 154) and int(ids[0, 2]) == int(ids[0, 77 + 2]) == 49408
        pooled = xl.encode_text(ids).pooled
        # the second encoder's projected state at the end-of-text token (position 4), not at v*'s (the highest id,
        # where transformers pools for the old end-of-text id 2 of SDXL's published config)
        assert xl.text_encoder_2.config.eos_token_id == 2
        out = xl.text_encoder_2(ids[:, 77:], output_hidden_states=True)
        projection = xl.text_encoder_2.text_projection
        torch.testing.assert_close(pooled, projection(out.last_hidden_state[:, 4]))
        assert not torch.allclose(pooled, projection(out.last_hidden_state[:, 2]))
    assert [len(t) for t in xl.tokenizers] == sizes
    assert all(not hasattr(te.get_input_embeddings(), "new") for te in xl.text_encoders)


def test_concepts_of_the_other_family_are_refused(sdxl_backbone, concept, xl_concept_path, backbone):
    with pytest.raises(ConceptFileError, match="was made for base model"):
        concept.apply(sdxl_backbone)
    with pytest.raises(ConceptFileError, match="was made for base model"):
        Concept.load(xl_concept_path).apply(backbone)


# ---------------------------------------------------------------------------------------------- mechanism


def test_capture_equals_full_softmax_reference(sdxl_backbone):
    xl, unet = sdxl_backbone, sdxl_backbone.unet
    install_processors(unet, train_kv=True)
    with torch.no_grad():
        for proc in unet.attn_processors.values():
            if isinstance(proc, ClicCrossAttnProcessor):
                for lin in proc.trained_linears().values():
                    lin.weight.add_(0.05 * torch.randn_like(lin.weight))
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        text = xl.encode_text(xl.tokenize(["a photo of a chair", "a red vase on a table"]))
    layers = cross_attention_layers(unet, ("up",))
    # up_blocks.0 (latent / 4, 2 transformers of depth 2), up_blocks.1 (latent / 2, 2 of depth 1)
    assert len(layers) == 6 and len(cross_attention_layers(unet, ("up",), factor=2)) == 2
    token_index = [3, 5]
    with torch.no_grad(), capture_token_maps(unet, torch.tensor([token_index, token_index]), layers, (16, 16)) as cap:
        unet(x, t, **text.unet_kwargs())
    ref = _full_softmax_maps(unet, x, t, text, token_index, layers, (16, 16))
    torch.testing.assert_close(cap.maps(), ref, rtol=1e-4, atol=1e-6)


def test_exactly_the_intended_parameters_train(tiny_sdxl_model_dir):
    xl = shared_backbone(tiny_sdxl_model_dir)
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("unet", xl.unet), ("text", xl.text_encoder), ("text_2", xl.text_encoder_2))}
    seen = {}

    def on_step(step, record):
        if step == 1:
            for name, m in (("unet", xl.unet), ("text", xl.text_encoder), ("text_2", xl.text_encoder_2),
                            ("vae", xl.vae)):
                seen[name] = sorted(n for n, p in m.named_parameters() if p.requires_grad)

    result = learn(xl, [random_image()], [square_mask()], learn_config(steps=3, object_class="chair", lr=1e-3),
                   progress=False, callback=on_step)
    # the token's row in each text encoder and K/V of every cross-attention layer (11), nothing else
    for name in ("text", "text_2"):
        assert len(seen[name]) == 1 and seen[name][0].endswith("embeddings.token_embedding.new")
    assert seen["vae"] == []
    assert len(seen["unet"]) == 22 and all(".attn2.processor.to_" in n for n in seen["unet"])
    assert {n.rsplit(".", 2)[-2] for n in seen["unet"]} == {"to_k", "to_v"}
    for name, m in (("unet", xl.unet), ("text", xl.text_encoder), ("text_2", xl.text_encoder_2)):
        for k, v in m.state_dict().items():
            if k in frozen[name]:
                assert torch.equal(v, frozen[name][k]), k
    # both encoders' rows moved
    init = initializer_embedding(xl, "pattern")
    learned = result.concept.embeddings[0]
    assert not torch.equal(learned[:32], init[:32]) and not torch.equal(learned[32:], init[32:])


def test_resume_after_kill_reproduces_uninterrupted_run(tiny_sdxl_model_dir, tmp_path):
    xl = shared_backbone(tiny_sdxl_model_dir)
    cfg = learn_config(object_class="chair", steps=4, checkpoint_every=2, lr=1e-3, seed=1)
    full = learn(xl, [random_image()], [square_mask()], cfg, out_path=tmp_path / "full.safetensors", progress=False)

    def kill(step, record):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "killed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        learn(xl, [random_image()], [square_mask()], cfg, out_path=out, log_path=tmp_path / "log.jsonl",
              progress=False, callback=kill)
    resumed = learn(xl, [random_image()], [square_mask()], cfg, out_path=out, log_path=tmp_path / "log.jsonl",
                    resume=True, progress=False)
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert torch.equal(resumed.concept.embeddings, full.concept.embeddings)
    assert all(torch.equal(resumed.concept.attn_weights[k], v) for k, v in full.concept.attn_weights.items())


# ---------------------------------------------------------------------------------------------- transfer, generation


def test_transfer_equals_the_stock_img2img_pipeline(sdxl_backbone, xl_concept_path, stock):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    concept, target = Concept.load(xl_concept_path), random_image(seed=3)
    cfg = TransferConfig(steps=STEPS, strength=0.6, blend=False, eta=0.0, composite=False, seeds=(4,))
    ours = transfer(sdxl_backbone, concept, target, square_mask(), cfg, progress=False)
    x_tg = sdxl_backbone.encode_image(target[None])           # a 4-channel image is used as the latent
    theirs = _pipeline(StableDiffusionXLImg2ImgPipeline, stock)(
        prompt=PROMPT, image=x_tg, strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(4), output_type="latent").images
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-5, atol=1e-5)


def test_blended_transfer_equals_the_stock_inpaint_pipeline(sdxl_backbone, xl_concept_path, stock):
    """Blending (eq. 6) without guidance is diffusers' inpainting with a 4-channel UNet (its mask resized nearest)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    concept, target, mask = Concept.load(xl_concept_path), random_image(seed=3), square_mask()
    nearest = F.interpolate(mask[None], size=(16, 16))
    cfg = TransferConfig(steps=STEPS, strength=0.6, eta=0.0, composite=False, seeds=(4,))
    ours = transfer(sdxl_backbone, concept, target, mask, cfg, progress=False, blend_mask=nearest)
    x_tg = sdxl_backbone.encode_image(target[None])
    theirs = _pipeline(StableDiffusionXLInpaintPipeline, stock)(
        prompt=PROMPT, image=x_tg, mask_image=mask[None], height=64, width=64, strength=0.6,
        num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator().manual_seed(4),
        output_type="latent").images
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-5, atol=1e-5)
    outside = nearest.expand_as(x_tg) == 0
    assert torch.equal(ours.latents[outside], x_tg[outside])


def test_export_in_a_stock_pipeline_gives_the_generated_image(tiny_sdxl_model_dir, sdxl_backbone, xl_concept_path,
                                                              stock):
    """t_s = 0 is text-to-image with the concept: the stock StableDiffusionXLPipeline with the export gives the same
    image; t_s = all steps is the base model's image (the stock pipeline without the concept)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    concept = Concept.load(xl_concept_path)
    ours = generate(sdxl_backbone, concept, GenerateConfig(steps=STEPS, base_steps=0, seeds=(5,)), progress=False)
    assert ours.prompt == "a photo of a chair, with <v*> style"
    theirs = stock(prompt=ours.prompt, num_inference_steps=STEPS, guidance_scale=7.5, output_type="pt",
                   generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close((ours.images / 2 + 0.5).clamp(0, 1), theirs, rtol=1e-4, atol=1e-4)

    base = generate(sdxl_backbone, concept, GenerateConfig(steps=STEPS, base_steps=STEPS, seeds=(5,)), progress=False)
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    base_theirs = plain(prompt=ours.base_prompt, num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
                        generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(base.latents, base_theirs, rtol=1e-5, atol=1e-5)
    assert (ours.latents - base.latents).abs().max() > 1e-3


def test_export_folder_and_load_concept_in_both_encoders(tiny_sdxl_model_dir, sdxl_backbone, xl_concept_path,
                                                        tmp_path):
    """The export in SDXL's layout (also without the backbone: the concept file records its encoders' sizes), read
    back whole; load_concept puts each encoder's part of v*'s rows into that encoder, and unload_concept takes v* out
    of both and the Custom Diffusion processors with it."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    concept = Concept.load(xl_concept_path)
    assert concept.meta["embedding_dims"] == [32, 48]
    with_backbone = export_diffusers(concept, tmp_path / "a", sdxl_backbone)
    without = export_diffusers(xl_concept_path, tmp_path / "b")
    for folder in (with_backbone, without):
        back = read_export(folder)
        assert back.tokens == ["<v*>"] and torch.equal(back.embeddings, concept.embeddings)
        assert back.attn_weights.keys() == concept.attn_weights.keys()
        assert all(torch.equal(back.attn_weights[k], v) for k, v in concept.attn_weights.items())
    assert sorted(p.name for p in with_backbone.glob("learned_embeds*")) == ["learned_embeds.safetensors"]
    bad = Concept(concept.tokens, concept.embeddings, concept.attn_weights,
                  {**concept.meta, "embedding_dims": [32, 40]})
    with pytest.raises(ConceptFileError, match=r"'embedding_dims' \[32, 40\] does not add up to .* width 80"):
        Concept.load(bad.save(tmp_path / "bad.safetensors"))

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    assert load_concept(pipe, xl_concept_path) == ["<v*>"]
    for tokenizer, encoder, rows in ((pipe.tokenizer, pipe.text_encoder, concept.embeddings[:, :32]),
                                     (pipe.tokenizer_2, pipe.text_encoder_2, concept.embeddings[:, 32:])):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<v*>")]
        torch.testing.assert_close(row, rows[0], rtol=0, atol=0)
    assert pipe.text_encoder_2.text_model.eos_token_id == pipe.tokenizer_2.eos_token_id
    kinds = [type(p) for p in pipe.unet.attn_processors.values()]
    assert kinds.count(CustomDiffusionAttnProcessor2_0) == len(concept.layers) > 0
    with pytest.raises(ConceptFileError, match="already has the token"):
        load_concept(pipe, with_backbone)
    unload_concept(pipe)
    assert all("<v*>" not in t.get_vocab() for t in (pipe.tokenizer, pipe.tokenizer_2))
    assert not any(isinstance(p, CustomDiffusionAttnProcessor2_0) for p in pipe.unet.attn_processors.values())


def test_clic_pipeline_on_sdxl_is_the_library(tiny_sdxl_model_dir, sdxl_backbone, xl_concept_path):
    """ClicPipeline.from_pretrained on an SDXL folder (and from_pipe of a stock SDXL pipeline) runs the library on an
    SDXLBackbone of its components: its generation is clic's."""
    from diffusers import StableDiffusionXLPipeline

    from clic.models import Backbone
    from clic.pipeline import ClicPipeline

    pipe = ClicPipeline.from_pretrained(tiny_sdxl_model_dir)
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    assert isinstance(pipe.backbone, SDXLBackbone)
    assert pipe.backbone.config_hash() == sdxl_backbone.config_hash()
    pipe.load_concept(xl_concept_path)
    out = pipe.generate(num_inference_steps=4, base_steps=0, output_type="latent",
                        generator=torch.Generator().manual_seed(3))
    concept = Concept.load(xl_concept_path)
    ours = generate(sdxl_backbone, concept, GenerateConfig(steps=4, base_steps=0, seeds=(3,)), progress=False)
    torch.testing.assert_close(out.images, ours.latents, rtol=1e-5, atol=1e-5)

    stock_pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    assert isinstance(Backbone.of_pipeline(stock_pipe), SDXLBackbone)
    shared = ClicPipeline.from_pipe(stock_pipe)
    assert shared.text_encoder_2 is stock_pipe.text_encoder_2 and isinstance(shared.backbone, SDXLBackbone)
    shared.load_concept(xl_concept_path)      # the same base model


def test_guidance_matching_and_discovery_run(sdxl_backbone, xl_concept_path):
    xl, concept = sdxl_backbone, Concept.load(xl_concept_path)
    seen = []
    result = transfer(xl, concept, random_image(seed=1), square_mask(),
                      TransferConfig(steps=4, t_start=1, eta=50.0, seeds=(2,)), progress=False, callback=seen.append)
    assert result.guided_steps == [1, 2, 3] and torch.isfinite(result.guidance_loss).all()
    assert not torch.equal(seen[0]["guided"], seen[0]["blended"])
    matcher = learn_matcher(xl, concept, random_image(), square_mask(), MatchConfig(steps=2, lr=1e-2), progress=False)
    assert matcher.token.embeddings.shape == (1, 80)
    mask = auto_target_mask(xl, matcher, random_image(seed=1))
    assert mask.shape == (1, 64, 64) and 0 < mask.mean() < 1
    found = discover(xl, [random_image(seed=k) for k in range(2)],
                     DiscoverConfig(object_class="chair", steps=2, learn_concept=False), progress=False)
    assert len(found.masks) == 2 and found.concept is None


# ---------------------------------------------------------------------------------------------- command line


def test_cli_learn_transfer_export(tiny_sdxl_model_dir, example_paths, tmp_path):
    image, mask = example_paths
    concept = tmp_path / "c.safetensors"
    assert main(["learn", "--model", tiny_sdxl_model_dir, "--image", image, "--mask", mask, "--object-class", "chair",
                 "--steps", "2", "--out", str(concept), "-q"]) == 0
    assert Concept.load(concept).meta["base_model"] == tiny_sdxl_model_dir
    assert main(["transfer", str(concept), "--target", image, "--mask", mask, "--steps", "3", "--t-start", "1",
                 "--out", str(tmp_path / "t"), "-q"]) == 0
    assert (tmp_path / "t" / "seed0.png").exists()
    assert main(["export-diffusers", str(concept), str(tmp_path / "export")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export" / "learned_embeds.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and json.loads(f.metadata()["tokens"]) == ["<v*>"]
        assert f.get_tensor("clip_l").shape == (1, 32) and f.get_tensor("clip_g").shape == (1, 48)


def test_sdxl_alias_names_the_hub_model(monkeypatch):
    import clic.models

    asked = []

    def offline(source, kw):
        asked.append(source)
        raise OSError("offline")

    monkeypatch.setattr(clic.models, "_model_index", offline)
    with pytest.raises(clic.models.ModelError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        load_backbone("sdxl", device="cpu")
    assert asked == ["stabilityai/stable-diffusion-xl-base-1.0"]


def test_make_model_tiny_sdxl_from_the_command_line(tmp_path):
    """`clic make-model tiny-sdxl DIR` writes a folder a stock StableDiffusionXLPipeline loads; its tokenizers are
    rebuilt offline as SDXL's: the first pads with the end token, the second (OpenCLIP bigG's) with "!" (id 0)."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "xl"
    assert main(["make-model", "tiny-sdxl", str(out)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2.config.projection_dim == 32
    xl = load_backbone(str(out), device="cpu")
    ids = xl.tokenize("a photo")
    assert ids[0, :5].tolist() == [49406, 320, 1125, 49407, 49407]
    assert ids[0, 77:82].tolist() == [49406, 320, 1125, 49407, 0]


def test_sdxl_random_has_the_sdxl_base_architecture():
    """sdxl-random is SDXL base 1.0's architecture: its published parameter counts, 70 cross-attention layers (36 in
    the up blocks: 30 at latent/4, 6 at latent/2), 1024 px, the text dimensions 768 + 1280 and the added embedding."""
    from clic.builder import build_pipeline

    pipe = build_pipeline("sdxl-random", device="meta")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    assert counts == {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863}
    unet = pipe.unet
    assert len(cross_attention_layers(unet, ("down", "mid", "up"))) == 70
    assert len(cross_attention_layers(unet, ("up",), 4)) == 30 and len(cross_attention_layers(unet, ("up",), 2)) == 6
    assert cross_attention_layers(unet, ("up",)) == cross_attention_layers(unet, ("up",), 4) + \
        cross_attention_layers(unet, ("up",), 2)
    assert {m.heads for n, m in unet.named_modules() if n.endswith("attn2")} == {10, 20}
    assert unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 1024
    assert unet.add_embedding.linear_1.in_features == 2816 and unet.config.cross_attention_dim == 2048


@pytest.mark.parametrize("method", ["custom-diffusion", "break-a-scene"])
def test_recipe_baselines_on_sdxl(tiny_sdxl_model_dir, method):
    """Custom Diffusion and Break-A-Scene are recipes of CLiC's loop: on SDXL they train both encoders' rows and every
    cross-attention K/V (Break-A-Scene's l_att on the latent/4 maps of the down and up blocks, as its 16x16 maps of a
    64x64 latent: 32x32 on SDXL at 1024 px), and transfer and generate as their method does."""
    from clic import baselines
    from clic.config import transfer_config

    xl = shared_backbone(tiny_sdxl_model_dir)
    cfg = learn_config(method, object_class="chair", steps=2, lr=1e-3, token_warmup_lr=1e-2)
    result = baselines.learn_concept(xl, [random_image()], [square_mask()], cfg, progress=False)
    concept = result.concept
    assert concept.embeddings.shape == (1, 80) and len(concept.attn_weights) == 22      # 11 layers' K and V
    if method == "break-a-scene":
        assert concept.meta["config"]["attn_factor"] == 4 and result.history[0]["l_att"] > 0
    res = baselines.transfer_concept(xl, concept, random_image(seed=3), square_mask(),
                                     transfer_config(method, steps=3, t_start=1), progress=False)
    assert res.images.shape == (1, 3, 64, 64) and torch.isfinite(res.images).all()
    gen = baselines.generate_concept(xl, concept, GenerateConfig(steps=2, base_steps=1, seeds=(0,)), progress=False)
    assert gen.images.shape == (1, 3, 64, 64)


def test_web_page_jobs_on_sdxl(tiny_sdxl_model_dir, tmp_path):
    """The web page's jobs (learn, transfer, generate, find the region) on an SDXL folder."""
    import numpy as np

    from clic.ui import Workbench

    rng = np.random.default_rng(0)
    image = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
    mask = np.zeros((96, 128), dtype=bool)
    mask[20:70, 40:100] = True
    bench = Workbench(tiny_sdxl_model_dir, "cpu", workdir=tmp_path)
    learned = bench.learn(image, mask, "chair", steps=2)
    assert Concept.load(learned.concept_path).embeddings.shape == (1, 80)
    results = bench.transfer(learned.concept_path, image, mask, t_start=1, steps=3)
    assert [c for _, c in results] == ["seed 0", "seed 0: CA(<v*>)"]
    assert [im.size for im, _ in results] == [(128, 96), (64, 64)]     # the target's own size, the model's view
    assert len(bench.generate(learned.concept_path, "vase", num=1, base_steps=1, steps=2)) == 1
    matcher = bench.learn_matcher(learned.concept_path, image, mask, steps=2)
    found = bench.find_region(matcher, learned.concept_path, image)
    assert found.shape == (96, 128) and found.dtype == bool


def test_realfill_on_sdxl_inpainting_equals_the_stock_pipeline(tiny_sdxl_inpaint_dir, sdxl_backbone):
    """RealFill on SDXL's inpainting layout: trains both encoders' rows and K/V, and its inpainting is the stock
    StableDiffusionXLInpaintPipeline's (strength 1: from pure noise, as RealFill's). A base (4-channel) SDXL model is
    refused, naming SDXL's inpainting checkpoint."""
    from diffusers import DDIMScheduler, StableDiffusionXLInpaintPipeline

    from clic import baselines
    from clic.config import transfer_config
    from clic.errors import ModelError
    from clic.imaging import to_pil

    with pytest.raises(ModelError, match="stable-diffusion-xl-1.0-inpainting-0.1"):
        baselines.learn_realfill(sdxl_backbone, [random_image()], [square_mask()], learn_config("realfill"))
    backbone = load_backbone(tiny_sdxl_inpaint_dir, device="cpu")
    assert backbone.is_inpainting and isinstance(backbone, SDXLBackbone)
    cfg = learn_config("realfill", steps=1, batch_size=1, lr=1e-2)
    concept = baselines.learn_concept(backbone, [random_image()], [square_mask()], cfg, progress=False).concept
    assert concept.embeddings.shape == (1, 80) and len(concept.attn_weights) == 22
    target = torch.from_numpy(__import__("numpy").asarray(to_pil(random_image(seed=7)), dtype="float32")
                              ).permute(2, 0, 1) / 127.5 - 1
    mask = square_mask(box=(16, 48, 8, 40))
    tcfg = transfer_config("realfill", steps=3, scheduler="ddim", guidance_scale=2.0, composite=False, seeds=(4,))
    ours = baselines.transfer_concept(backbone, concept, target, mask, tcfg, progress=False)
    with applied_concept(backbone, concept):
        pipe = StableDiffusionXLInpaintPipeline(
            vae=backbone.vae, text_encoder=backbone.text_encoder, text_encoder_2=backbone.text_encoder_2,
            tokenizer=backbone.tokenizer, tokenizer_2=backbone.tokenizer_2, unet=backbone.unet,
            scheduler=DDIMScheduler.from_config(backbone.scheduler_config, clip_sample=False),
            requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
        pipe.set_progress_bar_config(disable=True)
        stock = pipe("a photo of <v*>", image=to_pil(target), mask_image=to_pil(mask), height=64, width=64,
                     strength=1.0, num_inference_steps=3, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(4), output_type="pt").images
    torch.testing.assert_close((ours.images + 1) / 2, stock.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("train_token", [True, False], ids=["token-trains", "constant-text"])
def test_captured_learning_step_is_the_plain_step(tiny_sdxl_model_dir, train_token):
    """--cuda-graphs capture on SDXL (the static-buffer step a GPU records as one CUDA graph; here replayed eagerly):
    the plain loop's losses and weights, bit for bit, with two images and flips. Without a trained token the constant
    conditioning's rows (hidden states and pooled embeddings) are picked by device indices."""
    xl = shared_backbone(tiny_sdxl_model_dir)
    images, masks = [random_image(seed=i) for i in range(2)], [square_mask(), square_mask(box=(8, 24, 40, 56))]
    plain, captured = (learn(xl, images, masks, learn_config(steps=4, object_class="chair", lr=1e-3, seed=3,
                                                             train_token=train_token, cuda_graphs=mode,
                                                             channels_last=True), progress=False)
                       for mode in ("off", "capture"))
    assert plain.history == captured.history and len({r["t"] for r in plain.history}) > 1
    assert torch.equal(plain.concept.embeddings, captured.concept.embeddings)
    for key, value in plain.concept.attn_weights.items():
        assert torch.equal(value, captured.concept.attn_weights[key]), key
