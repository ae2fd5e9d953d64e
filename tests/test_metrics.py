"""Metrics against hand-computed values: PSNR, SSIM (window, map, masking), IoU, localisation, fidelity, cost."""

import json
import math

import pytest
import torch
from PIL import Image

from clic_lab.compare import metrics
from clic.cli import main
from clic.errors import ModelError


def _const(value01: float, size: int = 32) -> torch.Tensor:
    """A constant image with value ``value01`` in [0, 1], as a (3, H, W) tensor in [-1, 1]."""
    return torch.full((3, size, size), value01 * 2 - 1)


def _rand(size=32, seed=0):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_known_values():
    # MSE = (0.5 - 0.25)^2 = 1/16 -> 10 log10(16) dB
    assert metrics.psnr(_const(0.5), _const(0.25)) == pytest.approx(10 * math.log10(16), abs=1e-9)
    assert metrics.psnr(_const(0.5), _const(0.5)) == float("inf")
    # only the pixels outside the mask count: a wild change inside it leaves the value as it was
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:16, 8:16] = 1
    changed = _const(0.5).clone()
    changed[:, 8:16, 8:16] = 1.0
    assert metrics.psnr(changed, _const(0.25), mask) == pytest.approx(10 * math.log10(16), abs=1e-9)
    assert metrics.psnr(changed, _const(0.5), mask) == float("inf")


def test_gaussian_window():
    w = metrics.gaussian_window(11, 1.5)
    assert w.shape == (11, 11) and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(w[5, 5] / w[5, 6]) == pytest.approx(math.exp(1 / (2 * 1.5**2)), rel=1e-12)
    assert torch.equal(w, w.T)


def test_ssim_identity_and_constant_images():
    image = _rand()
    assert metrics.ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    # constant 0.25 vs 0.75: sigmas are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = 0.01^2
    expected = (2 * 0.25 * 0.75 + 1e-4) / (0.25**2 + 0.75**2 + 1e-4)
    assert metrics.ssim(_const(0.25), _const(0.75)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.3751 / 0.6251)


def test_ssim_map_matches_the_definition_at_one_window():
    a, b = (metrics._unit(_rand(16, s)) for s in (1, 2))
    w = metrics.gaussian_window(11, 1.5)
    got = metrics.ssim_map(a, b, w)
    assert got.shape == (1, 3, 6, 6)
    c, i, j = 1, 2, 4                                  # channel, window position (top-left corner)
    pa, pb = a[0, c, i:i + 11, j:j + 11], b[0, c, i:i + 11, j:j + 11]
    mu_a = sum(float(w[u, v] * pa[u, v]) for u in range(11) for v in range(11))
    mu_b = sum(float(w[u, v] * pb[u, v]) for u in range(11) for v in range(11))
    va = sum(float(w[u, v] * (pa[u, v] - mu_a) ** 2) for u in range(11) for v in range(11))
    vb = sum(float(w[u, v] * (pb[u, v] - mu_b) ** 2) for u in range(11) for v in range(11))
    cov = sum(float(w[u, v] * (pa[u, v] - mu_a) * (pb[u, v] - mu_b)) for u in range(11) for v in range(11))
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    assert float(got[0, c, i, j]) == pytest.approx(expected, abs=1e-10)


def test_ssim_outside_the_mask_ignores_windows_touching_it():
    target = _rand(48)
    mask = torch.zeros(1, 48, 48)
    mask[:, 30:40, 30:40] = 1
    result = target.clone()
    result[:, 30:40, 30:40] = -target[:, 30:40, 30:40]
    assert metrics.ssim(result, target) < 0.99
    assert metrics.ssim(result, target, mask) == pytest.approx(1.0, abs=1e-12)
    # a change right next to the mask is inside the windows that count
    result[:, 29, 29] = 1.0
    assert metrics.ssim(result, target, mask) < 1.0


def test_iou_and_attention_localisation():
    a, b = torch.zeros(8, 8), torch.zeros(8, 8)
    a[0:4] = 1                                         # 32 pixels
    b[2:6] = 1                                         # 32 pixels, 16 shared
    assert metrics.iou(a, b) == pytest.approx(16 / 48)
    assert math.isnan(metrics.iou(torch.zeros(4, 4), torch.zeros(4, 4)))

    mask = torch.zeros(1, 32, 32)
    mask[:, :16, :] = 1                                # the top half
    on_mask = torch.zeros(8, 8)
    on_mask[:4] = 0.3
    assert metrics.attention_localisation(on_mask, mask) == {"attn_iou": 1.0, "attn_mass": 1.0}
    uniform = metrics.attention_localisation(torch.ones(8, 8), mask)
    assert uniform["attn_mass"] == pytest.approx(0.5) and uniform["attn_iou"] == pytest.approx(0.5)
    half_max = torch.zeros(8, 8)
    half_max[0, 0], half_max[7, 7] = 1.0, 0.4          # only the first is >= half the maximum
    loc = metrics.attention_localisation(half_max, mask)
    assert loc["attn_mass"] == pytest.approx(1.0 / 1.4) and loc["attn_iou"] == pytest.approx(1 / 32)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=16)
    path = tmp_path_factory.mktemp("encoders") / "tiny-clip-vision"
    CLIPVisionModel(config).save_pretrained(path)
    return str(path)


def test_concept_fidelity_with_a_tiny_clip_vision_model(tiny_clip_dir):
    encoder = metrics.ImageEncoder.load(tiny_clip_dir)
    assert encoder.image_size == 32 and encoder.mean == metrics._CLIP_MEAN
    source, other = _rand(64, 1), _rand(64, 2)
    m_src = torch.zeros(1, 64, 64)
    m_src[:, 4:20, 10:30] = 1
    m_tg = torch.zeros(1, 64, 64)
    m_tg[:, 40:56, 30:50] = 1
    crop = metrics.region_crop(source, m_src)
    assert crop.shape == (1, 3, 20, 20)                       # square box of the 16 x 20 region
    assert torch.allclose(crop[0, :, 0, 5], torch.full((3,), 0.5))   # row above the region: grey
    # the same content moved to the target region: similarity 1; other content: less
    result = other.clone()
    result[:, 40:56, 30:50] = source[:, 4:20, 10:30]
    assert metrics.concept_fidelity(encoder, source, m_src, result, m_tg) == pytest.approx(1.0, abs=1e-5)
    assert metrics.concept_fidelity(encoder, source, m_src, other, m_tg) < 0.9999
    with pytest.raises(ModelError, match="cannot be loaded"):
        metrics.ImageEncoder.load(tiny_clip_dir + "-missing")


def test_lpips_is_skipped_with_a_note_when_unavailable(monkeypatch):
    monkeypatch.setattr(metrics, "_lpips_weights_present", lambda net: (False, "LPIPS skipped: not installed"))
    value, note = metrics.lpips_distance(_rand(), _rand(seed=1))
    assert value is None and "skipped" in note
    out = metrics.evaluate(_rand(), _rand(seed=1), torch.ones(1, 32, 32))
    assert out["lpips"] is None and any("LPIPS" in n for n in out["notes"])
    assert any("fidelity skipped" in n for n in out["notes"]) and any("localisation" in n for n in out["notes"])


def test_measure_records_time_and_memory():
    with metrics.measure("cpu") as cost:
        buf = torch.ones(4 * 2**20)                            # 16 MiB
        del buf
    assert cost.wall_s > 0 and cost.peak_gib > 0.01 and cost.memory in ("rss", "rss-lifetime")


def test_evaluate_command_prints_json(tmp_path, tiny_clip_dir, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    result = target.copy()
    result[16:32, 16:32] = 255 - result[16:32, 16:32]
    mask = np.zeros((64, 64), np.uint8)
    mask[16:32, 16:32] = 255
    for name, arr in (("t.png", target), ("r.png", result), ("m.png", mask)):
        Image.fromarray(arr).save(tmp_path / name)
    argv = ["evaluate", "--result", str(tmp_path / "r.png"), "--target", str(tmp_path / "t.png"),
            "--mask", str(tmp_path / "m.png"), "--no-lpips"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["psnr"] == "inf" and out["ssim"] == pytest.approx(1.0) and out["fidelity"] is None
    assert main(argv + ["--source", str(tmp_path / "t.png"), "--source-mask", str(tmp_path / "m.png"),
                        "--encoder", tiny_clip_dir]) == 0
    out = json.loads(capsys.readouterr().out)
    assert -1.0 <= out["fidelity"] <= 1.0
    assert main(argv + ["--source", str(tmp_path / "t.png")]) == 2
    assert "together" in capsys.readouterr().err
