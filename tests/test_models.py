"""Offline model building and loading: the CLIP tokenizer, the random-init layouts, the loader's errors."""

import json
import os

import pytest
import torch

from clic.builder import SPECS, build_clip_tokenizer
from clic.errors import ModelError
from clic.models import load_backbone, pick_device


def test_tokenizer_matches_sd14():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    # ids of the SD1.4 tokenizer (openai/clip-vit-large-patch14) for these prompts
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A Chair with ornaments.").input_ids[0] == 49406
    assert tok.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert tok.convert_ids_to_tokens([49406, 49407]) == ["<|startoftext|>", "<|endoftext|>"]
    padded = tok("a photo", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[3:6] == [49407, 49407, 49407]
    assert tok.model_max_length == 77


def test_make_model_writes_diffusers_layout(tiny_model_dir):
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_model_dir, sub)), sub
    index = json.load(open(os.path.join(tiny_model_dir, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionPipeline"
    backbone = load_backbone(tiny_model_dir, device="cpu")
    assert backbone.resolution == 64 and backbone.latent_size == 16 and backbone.vae_scale_factor == 4
    assert not any(p.requires_grad for p in backbone.unet.parameters())
    assert sum(p.numel() for p in backbone.unet.parameters()) < 3e6


def test_sd2_layout_sizes_come_from_configs(tiny_sd2_model_dir):
    backbone = load_backbone(tiny_sd2_model_dir, device="cpu")
    assert backbone.prediction_type == "v_prediction"
    assert backbone.unet.config.use_linear_projection
    assert backbone.tokenizer.pad_token == "!"
    assert backbone.text_encoder.config.hidden_size == 48


def test_tiny_vae_scaling_factor_gives_unit_variance_latents():
    """The tiny kinds' scaling factor is the calibration of their seed-0 VAE (as 0.18215 is SD's), and still near
    unit variance for other seeds (one constant keeps one architecture hash per kind)."""
    from clic.builder import TINY_VAE, build_pipeline, latent_scaling_factor

    assert latent_scaling_factor(build_pipeline("tiny").vae) == pytest.approx(TINY_VAE["scaling_factor"], rel=0.01)
    for kind, seed in (("tiny-sd2", 0), ("tiny", 123)):
        vae = build_pipeline(kind, seed=seed).vae
        assert vae.config.scaling_factor == TINY_VAE["scaling_factor"]
        assert 0.9 < latent_scaling_factor(vae) / vae.config.scaling_factor < 1.1


def test_sd14_random_has_the_sd14_architecture():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = SPECS["sd14-random"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"]))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 860
    assert round(sum(p.numel() for p in text.parameters()) / 1e6) == 123
    heads = {m.heads for n, m in unet.named_modules() if n.endswith("attn2")}
    assert heads == {8}


def test_missing_hub_model_offline_says_how_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="--model /path/to/model"):
        load_backbone("CompVis/stable-diffusion-v1-4", device="cpu")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        load_backbone(str(tmp_path), device="cpu")


def test_device_auto_falls_back_to_cpu():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in ("cuda", "mps", "cpu")
