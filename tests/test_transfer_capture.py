"""--cuda-graphs capture for transfer and generation: the denoising step over fixed tensors, each kind of step
recorded once and replayed (clic.capture).

Without a GPU the recording is :class:`clic.capture.EagerGraph` (a replay runs the static-buffer step): these tests
check that the step computes what the plain loop does, bit for bit (images, latents, maps, guidance losses, the
callback's tensors); that DDIM's update with the step index on the device is diffusers' ``DDIMScheduler.step`` at
every timestep; that the guidance's Adam variant in closed form is torch's Adam; that the step to be recorded needs
no device value and no copy from the host (models on the meta device), one copy a step; and how many graphs a
transfer records.
"""

from dataclasses import replace

import pytest
import torch
from conftest import DeviceReads, on_meta, random_image, shared_backbone, square_mask
from diffusers import DDIMScheduler

import clic.sampling
import clic.transfer
from clic.capture import WARMUP_STEPS, StepGraph
from clic.concept import Concept
from clic.config import GenerateConfig, TransferConfig, transfer_config
from clic.errors import InputError
from clic.generate import generate
from clic.models import load_backbone
from clic.sampling import DeviceDDIM
from clic.transfer import fresh_adam_step, transfer


def _recorded(monkeypatch, module):
    """Every StepGraph ``module`` makes, in order."""
    made = []

    class Recorded(StepGraph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(module, "StepGraph", Recorded)
    return made


# ---------------------------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("config", [
    {},                                                                   # the project's SD1 config: steps_offset 1
    {"clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5, "timestep_spacing": "linspace"},
], ids=["sd1", "clip-alpha-one", "v-trailing", "sample-linspace"])
def test_device_ddim_is_diffusers_step_at_every_timestep(tiny_model_dir, config):
    """DDIM's update with the alphas gathered from device tables by the step index gives ``DDIMScheduler.step``'s
    x_{t-1} to the bit at every step of the schedule, deterministic and with eta > 0 (its noise given), with the
    predicted x_0 clipped or not, the last step's alpha 1 or alpha_0, and the timestep spacings."""
    base = shared_backbone(tiny_model_dir).sampling_scheduler("ddim", **config)
    g = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=g), 3 * torch.randn(2, 4, 8, 8, generator=g)
    for eta in (0.0, 0.7):
        scheduler = DDIMScheduler.from_config(base.config)
        scheduler.set_timesteps(12)
        ddim = DeviceDDIM(scheduler, eta, "cpu")
        for i, t in enumerate(scheduler.timesteps):
            noise = torch.randn(sample.shape, generator=g) if eta else None
            want = scheduler.step(output, t, sample, eta=eta, variance_noise=noise).prev_sample
            assert torch.equal(ddim.step(output, sample, torch.tensor([i]), noise), want), (eta, i, int(t))


def test_device_ddim_refuses_what_it_does_not_run(tiny_model_dir):
    backbone = shared_backbone(tiny_model_dir)
    scheduler = backbone.sampling_scheduler("ddim", thresholding=True)
    scheduler.set_timesteps(4)
    with pytest.raises(InputError, match="dynamic thresholding"):
        DeviceDDIM(scheduler, 0.0, "cpu")
    scheduler = backbone.sampling_scheduler("euler")
    scheduler.set_timesteps(4)
    with pytest.raises(InputError, match="--scheduler ddim"):
        DeviceDDIM(scheduler, 0.0, "cpu")


def test_fresh_adam_step_is_torch_adam():
    """The guidance's Adam variant in closed form (moments from zero, step count 1, nothing on the host) is the first
    step of a fresh ``torch.optim.Adam``, to the bit."""
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 1e-3
    grad[0, 0, 0, :3] = 0
    for lr in (0.01, 1.0):
        param = torch.nn.Parameter(x.clone())
        param.grad = grad.clone()
        torch.optim.Adam([param], lr=lr).step()
        assert torch.equal(fresh_adam_step(x, grad, lr), param.detach())


def test_capture_options_are_checked():
    """capture records the step itself (no --compile-unet) and runs DDIM's update: one line naming the option."""
    for cls in (TransferConfig, GenerateConfig):
        cls(cuda_graphs="capture").check()
        with pytest.raises(InputError, match="does not go with --compile-unet"):
            cls(cuda_graphs="capture", compile_unet=True).check()
        with pytest.raises(InputError, match="needs --scheduler ddim, not euler"):
            cls(cuda_graphs="capture", scheduler="euler").check()
        with pytest.raises(InputError, match="--cuda-graphs must be"):
            cls(cuda_graphs=1).check()


# ---------------------------------------------------------------------------------------------- transfer


#: the paper's transfer (sgd guidance, DDIM eta 0, one blending noise) and the official one (Adam guidance toward
#: an all-ones map, DDIM eta 1, fresh blending noise, a posterior sample of x_tg, a soft mask, the last steps
#: unblended: a third kind of step), two seeds in a batch, each kind long enough to be recorded and replayed
CASES = {
    "paper": (transfer_config("paper", steps=10, t_start=1, guidance_range=(1, 5), eta=20.0, seeds=(3, 4),
                              batch_size=2), 2),
    "official": (transfer_config("official", steps=10, replace_steps=2, guidance_range=(0, 4), blend_until=7,
                                 eta=0.05, seeds=(5, 6), batch_size=2), 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_captured_transfer_is_the_plain_transfer(tiny_model_dir, concept, monkeypatch, name):
    """The captured loop gives the plain loop's images, latents, maps CA(v*) and guidance losses to the bit, and its
    callback the same tensors at every step; each kind of step warms up, is recorded once and replayed."""
    backbone, (cfg, kinds) = shared_backbone(tiny_model_dir), CASES[name]
    target, mask = random_image(seed=1), square_mask()
    runs, seen = {}, {"off": [], "capture": []}
    graphs = _recorded(monkeypatch, clic.transfer)
    for mode in ("off", "capture"):
        runs[mode] = transfer(backbone, concept, target, mask, replace(cfg, cuda_graphs=mode), progress=False,
                              callback=seen[mode].append)
    plain, captured = runs["off"], runs["capture"]
    for key in ("images", "decoded", "latents", "attention"):
        assert torch.equal(getattr(plain, key), getattr(captured, key)), key
    assert torch.equal(plain.guidance_loss.isnan(), captured.guidance_loss.isnan())
    assert torch.equal(plain.guidance_loss.nan_to_num(), captured.guidance_loss.nan_to_num())
    assert plain.guidance_loss.isfinite().sum() == 2 * len(plain.guided_steps) > 0 and (plain.attention != 0).any()
    assert [info["step"] for info in seen["capture"]] == [info["step"] for info in seen["off"]]
    for a, b in zip(seen["off"], seen["capture"]):
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value.nan_to_num(), b[key].nan_to_num()), (a["step"], key)
            else:
                assert value == b[key], (a["step"], key)
    assert len(graphs) == kinds
    assert [(g.captures, g.eager_steps, g.graph) for g in graphs] == [(1, WARMUP_STEPS, None)] * kinds


def test_every_batch_of_seeds_records_its_own(backbone, concept, monkeypatch):
    """Three seeds at two a batch: two batches, each with its guided and unguided graphs; the seeds' results do not
    depend on the batch they ran in (the plain loop's property, kept)."""
    graphs = _recorded(monkeypatch, clic.transfer)
    cfg = TransferConfig(steps=6, t_start=0, guidance_range=(0, 3), eta=10.0, seeds=(1, 2, 3), batch_size=2,
                         cuda_graphs="capture")
    together = transfer(backbone, concept, random_image(), square_mask(), cfg, progress=False)
    assert [g.captures for g in graphs] == [1, 1, 1, 1]
    alone = transfer(backbone, concept, random_image(), square_mask(), replace(cfg, seeds=(3,)), progress=False)
    torch.testing.assert_close(together.latents[2:], alone.latents, rtol=1e-5, atol=1e-6)


def test_recorded_transfer_step_needs_no_device_value(micro_model_dir, micro_concept, monkeypatch):
    """What a CUDA graph can hold: with the models on the meta device, no run of the step (eager or to be recorded)
    reads a device value or copies from the host, and each step sends its values in one copy (index, row, fresh
    blending noise, DDIM's noise), with a callback too."""
    monkeypatch.setattr(Concept, "check_base", lambda *a, **kw: None)       # reads weight statistics: set-up
    backbone = on_meta(load_backbone(micro_model_dir, device="cpu"))
    mode, inside, marks = DeviceReads(), [], []
    real_run = clic.transfer.StaticTransferStep.run

    def counted(self, *kind):
        before = (mode.reads, mode.writes)
        real_run(self, *kind)
        inside.append((mode.reads - before[0], mode.writes - before[1]))

    monkeypatch.setattr(clic.transfer.StaticTransferStep, "run", counted)
    cfg = TransferConfig(steps=5, t_start=0, guidance_range=(0, 3), eta=1.0, ddim_eta=1.0, blend_noise="fresh",
                         guidance_optimizer="adam", cuda_graphs="capture")
    with mode:
        transfer(backbone, micro_concept, random_image(), square_mask()[0], cfg, progress=False,
                 callback=lambda info: marks.append((mode.reads, mode.writes)))
    assert inside == [(0, 0)] * 5
    assert {reads for reads, _ in marks} == {marks[0][0]}                            # no read between steps
    assert [b[1] - a[1] for a, b in zip(marks, marks[1:])] == [1] * 4                 # one copy a step


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["ddim", "ddim-eta1"])
def test_captured_generation_is_the_plain_generation(backbone, concept, monkeypatch, eta):
    """Two-stage generation with each stage's step recorded (base and concept: two graphs) gives the plain loop's
    latents and images to the bit, with DDIM's noise (eta > 0) drawn from the seeds' generators as diffusers draws
    it; the callback sees the same latents."""
    graphs = _recorded(monkeypatch, clic.sampling)
    results, seen = {}, {"off": [], "capture": []}
    for mode in ("off", "capture"):
        cfg = GenerateConfig(steps=8, base_steps=3, seeds=(1, 2), batch_size=2, ddim_eta=eta, cuda_graphs=mode)
        results[mode] = generate(backbone, concept, cfg, progress=False, callback=seen[mode].append)
    assert torch.equal(results["off"].latents, results["capture"].latents)
    assert torch.equal(results["off"].images, results["capture"].images)
    assert [(i["stage"], i["step"]) for i in seen["off"]] == [(i["stage"], i["step"]) for i in seen["capture"]]
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(seen["off"], seen["capture"]))
    assert [(g.captures, g.eager_steps) for g in graphs] == [(1, WARMUP_STEPS)] * 2
