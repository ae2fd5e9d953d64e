"""Two-stage generation (sec. 4.1): peers (stock diffusers pipelines) at t_s = 0 and t_s = all steps, the processor
swap in between, and the CLI."""

from dataclasses import replace

import pytest
import torch
from conftest import DeviceReads, on_meta

from clic.attention import ClicCrossAttnProcessor
from clic.cli import main
from clic.stock import export_diffusers, load_concept
from clic.generate import GenerateConfig, fill_prompt, generate

STEPS = 8


def _stock(model_dir, export_dir=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if export_dir is not None:
        load_concept(pipe, export_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_latents(pipe, prompt, seed):
    return pipe(prompt=prompt, num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def test_prompts_follow_the_paper():
    assert fill_prompt(GenerateConfig.prompt, "chair", ["<v*>"]) == "a photo of a chair, with <v*> style"
    assert fill_prompt(GenerateConfig.base_prompt, "ornament", ["<v*>"]) == "a photo of an ornament"


def test_ts0_equals_stock_pipeline_with_exported_concept(tiny_model_dir, backbone, concept, tmp_path):
    ours = generate(backbone, concept, GenerateConfig(steps=STEPS, base_steps=0, seeds=(5,)), progress=False)
    assert ours.prompt == "a photo of a chair, with <v*> style"
    export_diffusers(concept, tmp_path / "export", backbone)
    theirs = _stock_latents(_stock(tiny_model_dir, tmp_path / "export"), ours.prompt, 5)
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-5, atol=1e-5)


def test_two_stage_uses_the_base_unet_for_the_first_ts_steps(tiny_model_dir, backbone, concept):
    before = dict(backbone.unet.attn_processors)
    trained = []

    def on_step(info):
        procs = backbone.unet.attn_processors.values()
        trained.append((info["stage"], any(isinstance(p, ClicCrossAttnProcessor) and p.trained_linears()
                                           for p in procs)))

    ours = generate(backbone, concept, GenerateConfig(steps=STEPS, base_steps=3, seeds=(2,)), progress=False,
                    callback=on_step)
    assert trained == [("base", False)] * 3 + [("concept", True)] * (STEPS - 3)
    assert all(backbone.unet.attn_processors[k] is v for k, v in before.items())       # restored

    # t_s = all steps: the base model's image (stock pipeline, no concept, "a photo of a chair")
    base = generate(backbone, concept, GenerateConfig(steps=STEPS, base_steps=STEPS, seeds=(2,)), progress=False)
    theirs = _stock_latents(_stock(tiny_model_dir), "a photo of a chair", 2)
    torch.testing.assert_close(base.latents, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.latents, base.latents, atol=1e-3)


def test_batch_and_seeds(backbone, concept):
    cfg = GenerateConfig(steps=3, base_steps=1, seeds=(4,), num=3, batch_size=2)
    result = generate(backbone, concept, cfg, progress=False)
    assert result.seeds == [4, 5, 6] and result.images.shape == (3, 3, 64, 64)
    single = generate(backbone, concept, GenerateConfig(steps=3, base_steps=1, seeds=(5,)), progress=False)
    torch.testing.assert_close(result.latents[1:2], single.latents, rtol=1e-4, atol=1e-4)


def test_cli_writes_images_and_grid(concept_path, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", str(concept_path), "--out", str(out), "--steps", "3", "--base-steps", "1", "--num",
                 "2", "--object-class", "vase", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "seed0.png", "seed1.png"]


@pytest.mark.parametrize("args, culprit", [
    (["--base-steps", "60"], "--base-steps 60 is outside the 50-step schedule"),
    (["--prompt", "a photo of a vase"], "does not contain the concept's token <v*>"),
    (["--model", "{other}"], "made for base model"),
    (["--seeds", "1", "2", "--num", "3"], "either several --seeds or --num"),
])
def test_cli_bad_input(concept_path, other_tiny_model_dir, tmp_path, capsys, args, culprit):
    out = tmp_path / "gen"
    argv = ["generate", str(concept_path), "--out", str(out), "-q",
            *[a.format(other=other_tiny_model_dir) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.count("\n") == 1
    assert not out.exists()


def test_compiled_unet_gives_the_same_images(micro_backbone, micro_concept):
    """--compile-unet --compile-mode cudagraphs: the same two-stage generation (base and concept UNet each traced)."""
    backbone, concept = micro_backbone, micro_concept       # the smallest UNet: tracing costs grow with its layers
    cfg = GenerateConfig(steps=3, base_steps=1, seeds=(4,), num=2, batch_size=2)
    plain = generate(backbone, concept, cfg, progress=False)
    graphed = generate(backbone, concept, replace(cfg, compile_unet=True, compile_mode="cudagraphs"), progress=False)
    torch.testing.assert_close(graphed.latents, plain.latents, rtol=1e-4, atol=1e-4)


def test_the_denoising_loop_never_waits_for_the_device(micro_model_dir, micro_concept, monkeypatch):
    """Both stages step without a value back from the device (on a GPU the host queues the steps without waiting):
    on the meta device, where there are no values, nothing is read between the steps of a stage."""
    from clic.concept import Concept
    from clic.models import load_backbone

    monkeypatch.setattr(Concept, "check_base", lambda *a, **kw: None)       # reads weight statistics: set-up
    backbone = on_meta(load_backbone(micro_model_dir, device="cpu"))       # the smallest model: every op is hooked
    concept = micro_concept
    mode, seen = DeviceReads(), {}
    with mode:
        generate(backbone, concept, GenerateConfig(steps=STEPS, base_steps=3, num=2, batch_size=2), progress=False,
                 callback=lambda info: seen.setdefault(info["stage"], set()).add((mode.reads, mode.writes)))
    assert len(seen["base"]) == len(seen["concept"]) == 1
