"""Concept transfer (sec. 3.2): eq. 6 blending, eq. 7 guidance, the pixel composite, start options, a stock
img2img peer, and the CLI's handling of bad input. Tiny model, short schedules."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import DeviceReads, on_meta, random_image, square_mask
from PIL import Image

from clic.cli import main
from clic.stock import load_concept
from clic.errors import InputError
from clic.imaging import resize_mask
from clic.config import learn_config
from clic.config import transfer_config as make_config
from clic.learn import learn
from clic.models import load_backbone
from clic.transfer import TransferConfig, feather_mask, transfer

STEPS = 10


def _cfg(**kw):
    return TransferConfig(**{"steps": STEPS, "t_start": 2, "eta": 0.0, **kw})


def test_blending_follows_eq6_and_composite_keeps_target_pixels(backbone, concept):
    from diffusers import DDIMScheduler

    target, mask = random_image(seed=1), square_mask()
    seen = []
    cfg = _cfg(eta=50.0, guidance_range=(0, 5), feather=3, seeds=(7,))
    result = transfer(backbone, concept, target, mask, cfg, progress=False, callback=seen.append)

    # the path outside M_tg, computed here independently: noised(x_tg, t_i) with the seed's first Gaussian draw
    x_tg = backbone.encode_image(target[None])
    noise = torch.randn(x_tg.shape, generator=torch.Generator().manual_seed(7))
    scheduler = DDIMScheduler.from_config(backbone.scheduler_config, clip_sample=False)
    scheduler.set_timesteps(STEPS)
    outside = result.blend_mask.expand_as(x_tg) == 0
    assert outside.any() and not outside.all()
    assert [info["step"] for info in seen] == list(range(2, STEPS))
    for info in seen:
        path = scheduler.add_noise(x_tg, noise, scheduler.timesteps[info["step"]].reshape(1))
        assert torch.equal(info["blended"][outside], path[outside])          # eq. 6, before guidance
    # the final latent: blended with noised(x_tg, 0) = x_tg (paper: every step)
    assert torch.equal(result.latents[outside], x_tg[outside])
    # the guided latents differ from the blended ones (guidance acts), also outside the mask before the UNet
    assert any(not torch.equal(info["guided"], info["blended"]) for info in seen if info["guided"] is not None)

    # pixel composite: beyond the feathered edge the pixels are the target's, bit for bit
    far = result.alpha.expand_as(result.images) == 0
    assert torch.equal(result.images[far], target[None].expand_as(result.images)[far])
    grown = torch.nn.functional.max_pool2d(mask[None], 5, stride=1, padding=2)   # alpha > 0 up to 2 px out
    assert torch.equal(result.alpha > 0, grown > 0)
    inside = mask.expand_as(result.images[0]) > 0
    assert (result.images[0][inside] - target[inside]).abs().mean() > 1e-3       # something was edited


def test_feather_ramp():
    m = torch.zeros(1, 9, 9)
    m[:, 4, 4] = 1
    alpha = feather_mask(m, 3)[0, 0]
    assert alpha[4, 4] == 1 and abs(alpha[4, 5] - 2 / 3) < 1e-6 and abs(alpha[4, 6] - 1 / 3) < 1e-6
    assert alpha[4, 7] == 0 and alpha[0, 0] == 0


def test_chessboard_distance_by_hand():
    from clic.imaging import chessboard_distance
    inside = torch.zeros(5, 7, dtype=torch.bool)
    inside[1, 1] = inside[3, 5] = True
    # max(|dy|, |dx|) to the nearer of (1, 1) and (3, 5)
    expected = torch.tensor([[1, 1, 1, 2, 3, 3, 3],
                             [1, 0, 1, 2, 2, 2, 2],
                             [1, 1, 1, 2, 1, 1, 1],
                             [2, 2, 2, 2, 1, 0, 1],
                             [3, 3, 3, 2, 1, 1, 1]], dtype=torch.int32)
    assert torch.equal(chessboard_distance(inside, 9), expected)
    assert torch.equal(chessboard_distance(inside, 2), expected.clamp(max=2))
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(chessboard_distance(nothing, 5), torch.full((3, 4), 5, dtype=torch.int32))


def test_feather_of_a_binary_mask_is_the_dilations_mean_to_the_bit():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        h, w = torch.randint(1, 40, (2,), generator=g).tolist()
        m = (torch.rand(1, h, w, generator=g) > torch.rand(1, generator=g).item()).float()
        for radius in (1, 2, 5, 13, 50):
            dilations = torch.stack([F.max_pool2d(m[None], 2 * k + 1, stride=1, padding=k) for k in range(radius)])
            assert torch.equal(feather_mask(m, radius), dilations.mean(0))
    soft = torch.rand(1, 9, 9, generator=g)          # a soft mask keeps the dilations
    assert torch.equal(feather_mask(soft, 2), torch.stack([soft[None], F.max_pool2d(soft[None], 3, 1, 1)]).mean(0))


def test_feather_radius_of_a_photo_does_not_cost_its_cube():
    # 4000 x 3000 px with the radius the commands scale to it (8 * 3000 / 512 = 47): dilations were 47 max-pools of
    # up to 93 x 93 windows over 12 megapixels; the distance transform reads each pixel a fixed number of times
    m = torch.zeros(1, 3000, 4000)
    m[:, 1000:2000, 1500:2500] = 1
    alpha = feather_mask(m, 47)[0, 0]
    def ramp(d):                                      # (radius - d) / radius, as float32 computes it
        return torch.tensor(47.0 - d) / 47

    # mask: rows 1000..1999, columns 1500..2499
    assert alpha[1500, 2000] == 1 and alpha[1500, 2500] == ramp(1) and alpha[1500, 2545] == ramp(46)
    assert alpha[1500, 2546] == 0 and alpha[954, 1454] == ramp(46) and alpha[953, 1453] == 0


def test_official_blending_range_leaves_the_last_steps_unblended(backbone, concept):
    seen = []
    result = transfer(backbone, concept, random_image(seed=1), square_mask(), _cfg(blend_until=7), progress=False,
                      callback=seen.append)
    assert [info["blended"] is not None for info in seen] == [i < 7 for i in range(2, STEPS)]
    x_tg = backbone.encode_image(random_image(seed=1)[None])
    outside = result.blend_mask.expand_as(x_tg) == 0
    assert not torch.equal(result.latents[outside], x_tg[outside])


def _mass_inside(result, mask, steps):
    rows = [result.steps.index(i) for i in steps]
    maps = result.attention[rows, :, 0]                                          # (S, N, h, w)
    m = resize_mask(mask[None], tuple(maps.shape[-2:]))[0]
    return ((maps * m).sum((-1, -2)) / maps.sum((-1, -2))).mean().item()


def test_guidance_raises_v_star_attention_inside_the_mask(backbone, concept):
    target, mask = random_image(seed=1), square_mask()
    grad_calls = []

    def spy(module, args, kwargs):
        if torch.is_grad_enabled():
            grad_calls.append(args[0].shape[0])

    hook = backbone.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        guided = transfer(backbone, concept, target, mask, _cfg(t_start=0, eta=100.0, guidance_range=(0, 6)),
                          progress=False)
    finally:
        hook.remove()
    plain = transfer(backbone, concept, target, mask, _cfg(t_start=0, eta=0.0), progress=False)

    assert guided.guided_steps == list(range(6)) and plain.guided_steps == []
    # a backward pass only at the guided steps, on the conditional branch only (batch 1, not the CFG batch 2)
    assert grad_calls == [1] * 6
    steps = guided.guided_steps
    assert _mass_inside(guided, mask, steps) > _mass_inside(plain, mask, steps) + 1e-3
    assert torch.isfinite(guided.guidance_loss[: len(steps)]).all() and torch.isnan(plain.guidance_loss).all()


def test_guidance_is_fp32_under_a_half_precision_unet(tiny_model_dir, backbone, concept):
    half = load_backbone(tiny_model_dir, device="cpu", dtype="bf16")
    assert half.unet.dtype == torch.bfloat16
    cfg, seen = _cfg(steps=3, t_start=0, eta=100.0), []
    result = transfer(half, concept, random_image(seed=1), square_mask(), cfg, progress=False, callback=seen.append)
    assert seen[0]["guided"].dtype == torch.float32 and seen[0]["maps"].dtype == torch.float32
    assert (seen[0]["guided"] - seen[0]["blended"]).abs().max() > 1e-3
    full = transfer(backbone, concept, random_image(seed=1), square_mask(), cfg, progress=False)
    torch.testing.assert_close(result.guidance_loss[0], full.guidance_loss[0], rtol=1e-3, atol=0)


def test_official_variant_adam_step_toward_all_ones(backbone, concept):
    seen = []
    cfg = make_config("official", steps=STEPS, replace_steps=3, seeds=(1,))
    assert cfg.guidance_optimizer == "adam" and cfg.guidance_target == "ones" and not cfg.composite
    assert cfg.start_step() == 2 and cfg.blend_until == 46 and cfg.ddim_eta == 1.0
    result = transfer(backbone, concept, random_image(seed=1), square_mask(), cfg, progress=False,
                      callback=seen.append)
    step = seen[0]["guided"] - seen[0]["blended"]
    # a fresh Adam's first step moves each element by about lr = 0.01
    assert 0.005 < step.abs().max() <= 0.0101
    assert torch.equal(result.images, result.decoded)


def test_start_options_agree(backbone, concept):
    target, mask = random_image(seed=2), square_mask()
    runs = [transfer(backbone, concept, target, mask, TransferConfig(steps=STEPS, eta=0.0, **start), progress=False)
            for start in ({"t_start": 4}, {"strength": 0.6}, {"replace_steps": 5})]
    assert all(r.steps[0] == 4 for r in runs)
    assert torch.equal(runs[0].latents, runs[1].latents) and torch.equal(runs[0].latents, runs[2].latents)
    assert TransferConfig().start_step() == 15                                   # paper default, 15 of 50
    assert make_config("official", t_start=3).replace_steps is None              # explicit start wins


@pytest.mark.parametrize("scheduler, cls", [("ddim", "DDIMScheduler"),
                                            ("euler-ancestral", "EulerAncestralDiscreteScheduler")])
def test_matches_stock_img2img_pipeline(tiny_model_dir, backbone, concept, tmp_path, scheduler, cls):
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    target = random_image(seed=3)
    cfg = TransferConfig(steps=STEPS, strength=0.6, blend=False, eta=0.0, composite=False, seeds=(4,),
                         scheduler=scheduler)
    ours = transfer(backbone, concept, target, square_mask(), cfg, progress=False)

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, clip_sample=False)   # stochastic: same draws
    load_concept(pipe, concept)
    pipe.set_progress_bar_config(disable=True)
    # the target's latent is passed in (a 4-channel image is used as is): both start from the same x_tg
    x_tg = backbone.encode_image(target[None])
    theirs = pipe(prompt=concept.meta["prompt"], image=x_tg, strength=0.6, num_inference_steps=STEPS,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(4), output_type="latent").images
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-5, atol=1e-5)


def test_processors_restored_seeds_independent_of_batch(backbone, concept):
    before = dict(backbone.unet.attn_processors)
    target, mask = random_image(seed=1), square_mask()
    cfg = _cfg(seeds=(0, 1), batch_size=2, eta=5.0, guidance_range=(2, 4))
    both = transfer(backbone, concept, target, mask, cfg, progress=False)
    assert all(backbone.unet.attn_processors[k] is v for k, v in before.items())
    one = transfer(backbone, concept, target, mask, replace(cfg, seeds=(1,), batch_size=1), progress=False)
    torch.testing.assert_close(both.latents[1:], one.latents, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both.latents[0], both.latents[1])
    assert both.attention.shape == (STEPS - 2, 2, 1, 16, 16)


def test_sd2_v_prediction(tiny_sd2_model_dir):
    backbone = load_backbone(tiny_sd2_model_dir, device="cpu")
    concept = learn(backbone, [random_image()], [square_mask()], learn_config(steps=2, object_class="chair"),
                    progress=False).concept
    assert backbone.prediction_type == "v_prediction"
    result = transfer(backbone, concept, random_image(seed=1), square_mask(), _cfg(steps=3, t_start=1, eta=10.0),
                      progress=False)
    assert torch.isfinite(result.images).all() and result.guided_steps == [1, 2]


def test_api_refuses_bad_input(backbone, concept):
    with pytest.raises(InputError, match="empty"):
        transfer(backbone, concept, random_image(), torch.zeros(1, 64, 64), _cfg(), progress=False)
    with pytest.raises(InputError, match="differ in size"):
        transfer(backbone, concept, random_image(), torch.ones(1, 64, 32), _cfg(), progress=False)
    with pytest.raises(InputError, match="one start option"):
        transfer(backbone, concept, random_image(), square_mask(), _cfg(strength=0.5), progress=False)


# ---------------------------------------------------------------------------------------------- CLI


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:24, 40:56] = 255
    return {
        "target": _png(tmp_path / "target.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        "mask": _png(tmp_path / "mask.png", mask),
        "empty": _png(tmp_path / "empty.png", np.zeros((64, 64), np.uint8)),
        "full": _png(tmp_path / "full.png", np.full((64, 64), 255, np.uint8)),
        "wide": _png(tmp_path / "wide.png", np.full((32, 64), 255, np.uint8)),
    }


def test_cli_writes_results_grid_and_attention(concept_path, files, tmp_path):
    out = tmp_path / "out"
    rc = main(["transfer", str(concept_path), "--target", files["target"], "--mask", files["mask"], "--source",
               files["target"], "--out", str(out), "--steps", "4", "--t-start", "2", "--guidance-range", "2", "3",
               "--seeds", "0", "1", "--save-attention", "--feather", "2", "-q"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention_seed0.png", "attention_seed1.png", "grid.png",
                                                     "seed0.png", "seed1.png"]
    # the written PNG: outside the mask grown by the feather, the target's pixels exactly
    target = np.asarray(Image.open(files["target"]))
    result = np.asarray(Image.open(out / "seed0.png"))
    far = np.ones((64, 64), bool)
    far[8 - 2:24 + 2, 40 - 2:56 + 2] = False
    assert np.array_equal(result[far], target[far])


def test_cli_result_has_the_targets_own_size(concept_path, tmp_path):
    rng = np.random.default_rng(1)
    target = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)                  # 96 x 64: cropped to 64 x 64
    mask = np.zeros((64, 96), np.uint8)
    mask[20:40, 30:50] = 255
    out = tmp_path / "out"
    assert main(["transfer", str(concept_path), "--target", _png(tmp_path / "t.png", target), "--mask",
                 _png(tmp_path / "m.png", mask), "--out", str(out), "--steps", "3", "--t-start", "1", "--eta", "0",
                 "--feather", "2", "-q"]) == 0
    result = np.asarray(Image.open(out / "seed0.png"))
    assert result.shape == target.shape
    far = np.ones((64, 96), bool)
    far[20 - 2:40 + 2, 30 - 2:50 + 2] = False                                   # outside the crop too
    assert np.array_equal(result[far], target[far])
    assert np.abs(result[20:40, 30:50].astype(int) - target[20:40, 30:50]).mean() > 1


@pytest.mark.parametrize("args, culprit", [
    (["--mask", "{empty}"], "empty.png: mask is empty"),
    (["--mask", "{full}"], "full.png: mask covers the whole image"),
    (["--mask", "{wide}"], "different aspect ratio"),
    (["--model", "{other}"], "made for base model"),
    (["--prompt", "a chair with dots"], "does not contain the concept's token <v*>"),
    (["--eta", "-1"], "--eta must be >= 0"),
    (["--t-start", "50"], "--t-start 50 is outside the 50-step schedule"),
    (["--strength", "0.01"], "--strength 0.01 is outside"),
    (["--replace-steps", "60"], "--replace-steps 60 is outside"),
    (["--t-start", "3", "--strength", "0.5"], "give one start option"),
])
def test_cli_bad_input(concept_path, files, other_tiny_model_dir, tmp_path, capsys, args, culprit):
    out = tmp_path / "out"
    values = {**files, "other": other_tiny_model_dir}
    argv = ["transfer", str(concept_path), "--target", files["target"], "--mask", files["mask"], "--out", str(out),
            "-q", *[a.format(**values) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.count("\n") == 1
    assert not out.exists()


def test_compiled_unet_gives_the_same_transfer(micro_backbone, micro_concept):
    """--compile-unet --compile-mode cudagraphs (CUDA graphs on a GPU; here the traced graphs run as they are):
    the same guided transfer, and the backbone keeps its own UNet."""
    backbone, concept = micro_backbone, micro_concept       # the smallest UNet: tracing costs grow with its layers
    target, mask = random_image(seed=1), square_mask()
    cfg = _cfg(eta=5.0, guidance_range=(2, 5))
    plain = transfer(backbone, concept, target, mask, cfg, progress=False)
    graphed = transfer(backbone, concept, target, mask, replace(cfg, compile_unet=True, compile_mode="cudagraphs"),
                       progress=False)
    torch.testing.assert_close(graphed.latents, plain.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graphed.guidance_loss, plain.guidance_loss, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert "forward" not in vars(backbone.unet)
    with pytest.raises(InputError, match="--compile-mode cudagraphs needs --compile-unet"):
        transfer(backbone, concept, target, mask, replace(cfg, compile_mode="cudagraphs"), progress=False)


def test_the_denoising_loop_never_waits_for_the_device(micro_model_dir, micro_concept, monkeypatch):
    """Blending, guidance (a backward pass per guided step) and the scheduler's step need no value back from the
    device (on a GPU: the host queues the steps without waiting; the maps and losses come back once, at the end). On
    the meta device, where there are no values, the loop runs through and reads nothing between its steps."""
    from clic.concept import Concept

    monkeypatch.setattr(Concept, "check_base", lambda *a, **kw: None)       # reads weight statistics: set-up
    backbone = on_meta(load_backbone(micro_model_dir, device="cpu"))       # the smallest model: every op is hooked
    concept = micro_concept
    mode, seen = DeviceReads(), []
    with mode:
        transfer(backbone, concept, random_image(), square_mask()[0], _cfg(t_start=0, guidance_range=(0, 4), eta=1.0),
                 progress=False, callback=lambda info: seen.append((mode.reads, mode.writes)))
    assert len(seen) == STEPS and len(set(seen)) == 1


def test_cached_text_keys_and_values_give_the_same_transfer(backbone, concept, monkeypatch):
    """The denoising loop reuses each layer's text K/V across steps (guided and CFG passes alike): the same latents,
    maps and guidance losses, to the bit, as projecting them at every step."""
    import contextlib

    import clic.sampling

    cfg = _cfg(t_start=0, guidance_range=(0, 5), eta=1.0)
    cached = transfer(backbone, concept, random_image(), square_mask()[0], cfg, progress=False)
    monkeypatch.setattr(clic.sampling, "text_kv_cached", lambda unet, enabled=True: contextlib.nullcontext())
    plain = transfer(backbone, concept, random_image(), square_mask()[0], cfg, progress=False)
    assert torch.equal(cached.latents, plain.latents) and torch.equal(cached.attention, plain.attention)
    torch.testing.assert_close(cached.guidance_loss, plain.guidance_loss, rtol=0, atol=0, equal_nan=True)
