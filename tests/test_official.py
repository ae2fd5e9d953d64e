"""The official recipe computes what the official CLiC code computes.

First each difference between the paper and the official code, as a formula on small hand-made tensors with
hand-computed values; then learning's first step and a whole transfer of the official recipe against a
straightforward computation written here from those formulas (explicit attention, the official code's order of
operations), given the same injected random draws; then the draws' recording and replay, the comparison script and
the command line. That the paper recipe is unchanged is tests/test_recipes_unchanged.py's job."""

import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image, square_mask
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention
from PIL import Image

from clic.attention import ClicCrossAttnProcessor, attention_outputs_detached, start_token_detached
from clic.cli import main
from clic.concept import Concept, applied_concept, restored_model
from clic.config import OFFICIAL_ROI_PROMPTS, learn_config, transfer_config
from clic.draws import RecordedDraws, ReplayedDraws, SeededDraws
from clic.errors import InputError
from clic.imaging import load_image, load_latent_mask, load_mask, resize_mask
from clic.learn import draw, initial_vectors, learn, prepare_sources
from clic.losses import context_loss, roi_loss, soft_mask, valid_region
from clic.tokens import add_placeholders, base_table, concept_embedding, initializer_id
from clic.transfer import guidance_loss, latent_mask, transfer

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the formulas


def test_l_con_official_divides_by_the_one_channel_mask():
    """Item 1: sum over pixels and channels of M_soft (e_hat - e)^2, over the sum of the 1-channel M_soft."""
    eps_hat = torch.tensor([[[[1.0, 2.0]], [[0.0, 3.0]]]])             # (1, 2 channels, 1, 2): errors 1, 4 | 0, 9
    m = torch.tensor([[[[1.0, 0.5]]]])                                 # (1, 1, 1, 2)
    # (1*1 + 0.5*4 + 1*0 + 0.5*9) / (1 + 0.5) = 7.5 / 1.5
    assert context_loss(eps_hat, torch.zeros_like(eps_hat), m, "official").item() == pytest.approx(5.0)
    # a uniform error of 1 over 4 latent channels: 4 (1 + 0.25) / 1.25 = 4, not the per-element mean 1
    ones = torch.ones(1, 4, 1, 2)
    assert context_loss(ones, torch.zeros_like(ones), torch.tensor([[[[1.0, 0.25]]]]), "official").item() == 4.0
    # the paper's form is unchanged: mean of (M (e_hat - e))^2 = (1 + 0.25*4 + 0 + 0.25*9) / 4
    assert context_loss(eps_hat, torch.zeros_like(eps_hat), m, "paper").item() == pytest.approx(4.25 / 4)


def test_l_roi_mask_weighting_divides_by_the_one_channel_mask():
    eps_hat = torch.tensor([[[[1.0, 2.0]], [[0.0, 3.0]]]])
    assert roi_loss(eps_hat, torch.zeros_like(eps_hat), torch.tensor([[[[1.0, 0.5]]]])).item() == pytest.approx(5.0)
    # weight (1, 0): (1*1 + 1*0) / 1
    assert roi_loss(eps_hat, torch.zeros_like(eps_hat), torch.tensor([[[[1.0, 0.0]]]])).item() == 1.0


def _one_head_attention():
    """A 2-d, one-head attention layer: Q = identity, K = 0 (so every token gets probability 1/L), V = identity,
    out = identity."""
    attn = Attention(query_dim=2, cross_attention_dim=2, heads=1, dim_head=2)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(2))
        attn.to_k.weight.zero_()
        attn.to_v.weight.copy_(torch.eye(2))
        attn.to_out[0].weight.copy_(torch.eye(2))
        attn.to_out[0].bias.zero_()
    return attn


@pytest.mark.parametrize("detached", [False, True])
def test_start_token_passes_no_gradient_to_trained_kv(detached):
    """Item 2. One query q = (1, 0), two text tokens E = (1, 2) [start] and (3, 4); K = 0 gives p = (1/2, 1/2),
    so out = (E_0 + E_1) / 2 = (2, 3). For S = sum(out):
    dS/dW_v[a] = sum_l p_l E_l = (2, 3), and (3, 4) / 2 = (1.5, 2) without the start token;
    dS/dlogit_l = p_l (sum(E_l) - 5) = (-1, 1), dS/dW_k = scale q (x) sum_l dS/dlogit_l E_l = scale [(2, 2), (0, 0)],
    and scale [(3, 4), (0, 0)] without the start token."""
    attn = _one_head_attention()
    proc = ClicCrossAttnProcessor(attn, train_kv=True)
    hidden, text = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    with start_token_detached([proc], detached):
        out = proc(attn, hidden, text)
    out.sum().backward()
    assert out.tolist() == [[[2.0, 3.0]]]                                     # the same forward either way
    scale = 1 / math.sqrt(2)
    if detached:
        want_v, want_k = [[1.5, 2.0], [1.5, 2.0]], [[3 * scale, 4 * scale], [0.0, 0.0]]
    else:
        want_v, want_k = [[2.0, 3.0], [2.0, 3.0]], [[2 * scale, 2 * scale], [0.0, 0.0]]
    torch.testing.assert_close(proc.to_v.weight.grad, torch.tensor(want_v))
    torch.testing.assert_close(proc.to_k.weight.grad, torch.tensor(want_k))
    assert proc.start_token_grad                                              # put back


def test_mask_resize_without_antialias_samples_four_pixels():
    """Item 3: 8 -> 2 plain bilinear: latent cell (0, 0) is the mean of pixels (1..2, 1..2), nothing else."""
    m = torch.zeros(1, 8, 8)
    m[0, 1:3, 1:3] = 1.0
    assert resize_mask(m, (2, 2), antialias=False).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    corner = torch.zeros(1, 8, 8)
    corner[0, 0, 0] = 1.0
    assert resize_mask(corner, (2, 2), antialias=False).sum() == 0                # never sampled
    assert resize_mask(corner, (2, 2))[0, 0, 0] > 0                               # area-aware: counted


def test_valid_region_leaves_out_the_outer_ring():
    """Item 4: the context mask times the valid region: 0 on the latent's outer ring (a 4 x 4 latent keeps 2 x 2)."""
    region = valid_region((4, 4), 1)
    assert region.tolist() == [[[[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]]]
    err = torch.ones(1, 4, 4, 4)
    err[..., 0, 0] = 100.0                                                    # a huge error on the ring is ignored
    m = soft_mask(torch.zeros(1, 1, 4, 4), 0.25, "floor") * region            # 0.25 on the 4 inner cells
    # 4 channels x 4 cells x 0.25 x 1 / (4 x 0.25)
    assert context_loss(err, torch.zeros_like(err), m, "official").item() == 4.0


def test_soft_mask_floor_and_affine():
    """Item 5: values below 0.05 become alpha, the rest kept; eq. 2 maps m to alpha + (1 - alpha) m."""
    m = torch.tensor([0.0, 0.04, 0.05, 0.1, 0.6, 1.0])
    assert soft_mask(m, 0.25, "floor").tolist() == pytest.approx([0.25, 0.25, 0.05, 0.1, 0.6, 1.0])
    assert soft_mask(m, 0.25).tolist() == pytest.approx([0.25, 0.28, 0.2875, 0.325, 0.7, 1.0])
    with pytest.raises(ValueError):
        soft_mask(m, 0.25, "other")


def test_initializer_names_a_vocabulary_piece(backbone):
    """Item 6: the official initializer 'ktn' is the sub-word piece of id 42170, not the word (two pieces)."""
    assert initializer_id(backbone.tokenizer, "piece:ktn") == 42170
    assert initializer_id(backbone.tokenizer, "pattern") == backbone.tokenizer.convert_tokens_to_ids("pattern</w>")
    with pytest.raises(InputError, match="single token.*piece:k"):
        initializer_id(backbone.tokenizer, "ktn")
    with pytest.raises(InputError, match="not an entry"):
        initializer_id(backbone.tokenizer, "piece:ktn-not-there")
    assert learn_config("official").initializer == "piece:ktn"


def test_roi_prompt_drawn_from_the_templates(backbone):
    """Item 7: the RoI row of a step is the prompt drawn for it, '{token} on a blank background' for draw 3."""
    cfg = learn_config("official", object_class="chair")
    assert cfg.rois() == OFFICIAL_ROI_PROMPTS and len(cfg.rois()) == 8
    assert learn_config("paper").rois() == ("a photo of {token}",)
    start = Concept.untrained(cfg.tokens(1), initial_vectors(backbone, cfg, 1))
    with applied_concept(backbone, start, train=cfg.train, train_token=True) as applied:
        src = prepare_sources(backbone, [random_image()], [square_mask()], cfg, applied)
        noise = draw(src, cfg, ReplayedDraws({"1/image": 0, "1/flip": 0.9, "1/t": 10, "1/eps": torch.zeros(1, 4, 16, 16),
                                              "1/roi_prompt/0": 3, "1/z": torch.zeros(1, 4, 16, 16),
                                              "1/z_roi": torch.zeros(1, 4, 16, 16)}), 1)
        assert noise.roi_prompts == [3] and not noise.flip
        ids = src.ids(noise)
        assert torch.equal(ids[0], backbone.tokenize("a chair with <v*> style")[0])
        assert torch.equal(ids[1], backbone.tokenize("<v*> on a blank background")[0])
        assert src.positions(noise).tolist() == [[4], [1]]


def test_posterior_sample(backbone):
    """Item 8 (and 12): x_0 = (mean + std z) * scale; mean (1, 2), std (0.5, 2), z (2, -1) -> (2, 0) * scale."""
    x = backbone.posterior_sample(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0]), torch.tensor([2.0, -1.0]))
    assert x.tolist() == pytest.approx([2 * backbone.vae.config.scaling_factor, 0.0])


def _png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


def test_stretched_inputs_and_soft_masks(tmp_path):
    """Item 9: a 8 x 4 image, black left half, white right half: stretched to 4 x 4 its outer columns stay black and
    white (the whole width is kept), where the centre crop keeps columns 2..5 (two black, two white); the mask keeps
    its grey level 128 as 128/255 instead of 1."""
    image = np.zeros((4, 8, 3))
    image[:, 4:] = 255
    path = _png(tmp_path / "i.png", image)
    stretched, cropped = load_image(path, 4, "stretch")[0], load_image(path, 4)[0]
    assert (stretched[:, 0] == -1).all() and (stretched[:, 3] == 1).all() and (stretched[:, 1] > -1).all()
    assert (cropped[:, :2] == -1).all() and (cropped[:, 2:] == 1).all()
    mask = np.zeros((4, 4))
    mask[1:3, 1:3] = 128
    soft = load_mask(_png(tmp_path / "m.png", mask), 4, threshold=None, fit="stretch")
    assert soft[0, 1, 1].item() == pytest.approx(128 / 255) and soft[0, 0, 0] == 0
    assert load_mask(tmp_path / "m.png", 4)[0, 1, 1] == 1.0                   # thresholded at 0.5 by default


def test_blend_mask_bicubic_is_soft(tmp_path):
    """Item 10: the mask's 8-bit grey levels resized by PIL's bicubic filter straight to the latent: a constant 0.5
    mask gives 128/255 everywhere; a half-white mask gives soft edge cells (left + right = 1 up to 8-bit rounding),
    where 'any' gives 0 or 1."""
    half = torch.full((1, 8, 8), 0.5)
    assert latent_mask(half, (2, 2), "bicubic").flatten().tolist() == pytest.approx([128 / 255] * 4)
    assert load_latent_mask(_png(tmp_path / "h.png", np.full((8, 8), 128)), (2, 2)).flatten().tolist() == \
        pytest.approx([128 / 255] * 4)
    left = torch.zeros(1, 16, 16)
    left[:, :, :8] = 1.0
    soft = latent_mask(left, (4, 4), "bicubic")[0, 0]
    edge = soft[:, 1:3]
    assert ((edge > 0) & (edge < 1)).all() and (soft[:, 1] + soft[:, 2] - 1).abs().max() <= 1 / 255
    assert set(latent_mask(left, (4, 4), "any").flatten().tolist()) == {0.0, 1.0}


def test_gradient_through_attention_outputs_can_be_cut():
    """Item 11: y = x + attention(x): with the attention outputs detached, dy/dx is the identity (the residual path
    only); with them, the attention adds its own terms."""
    block = torch.nn.ModuleDict({"attn": _one_head_attention()})
    with torch.no_grad():
        block.attn.to_k.weight.copy_(torch.eye(2))              # a self-attention that depends on its input
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], requires_grad=True)
    for detached in (True, False):
        with attention_outputs_detached(block, detached):
            y = x + block.attn(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(grad, torch.ones_like(x)) == detached
    assert not block.attn._forward_hooks                       # hooks removed


def test_blending_noise_fresh_at_every_step(backbone, concept):
    """Item 12: with fresh blending noise, noised(x_tg, t_i) of step i is add_noise(x_tg, that step's own draw,
    t_i); with one draw (the paper's), every step uses the start noise."""
    for fresh in (True, False):
        record, seen = RecordedDraws(SeededDraws(3)), []
        cfg = transfer_config("official", steps=5, replace_steps=2, eta=0.0, posterior="mean",
                              blend_noise="fresh" if fresh else "once")
        transfer(backbone, concept, random_image(seed=1), square_mask(), cfg, progress=False,
                 draws=lambda seed: record, callback=seen.append)
        x_tg = backbone.encode_image(random_image(seed=1)[None])
        scheduler = DDIMScheduler.from_config(backbone.scheduler_config, clip_sample=False)
        scheduler.set_timesteps(5)
        assert [info["step"] for info in seen] == [1, 2, 3, 4]
        for info in seen:
            eps = record.record[f"{info['step']}/blend" if fresh else "initial"]
            want = scheduler.add_noise(x_tg, eps, scheduler.timesteps[info["step"]].reshape(1))
            assert torch.equal(info["target_noised"], want)
        assert any(k.endswith("/blend") for k in record.record) == fresh


def test_guidance_loss_mean_or_sum():
    """Item 13: (0.5, 1, 0, 0.25) against ones: errors 0.25, 0, 1, 0.5625 -> sum 1.8125, mean 0.453125."""
    ca = torch.tensor([[[[0.5, 1.0], [0.0, 0.25]]]])
    ones = torch.ones(1, 1, 2, 2)
    assert guidance_loss(ca, ones).item() == 1.8125
    assert guidance_loss(ca, ones, "mean").item() == 0.453125


def test_official_recipe_sets_every_option():
    learn_cfg, transfer_cfg = learn_config("official"), transfer_config("official")
    assert (learn_cfg.context_form, learn_cfg.roi_weighting, learn_cfg.start_token_grad, learn_cfg.mask_antialias,
            learn_cfg.context_border, learn_cfg.soft_mask_form, learn_cfg.posterior, learn_cfg.image_fit,
            learn_cfg.binary_masks) == ("official", "mask", False, False, 1, "floor", "sample", "stretch", False)
    assert (transfer_cfg.blend_mask, transfer_cfg.guidance_attention_grad, transfer_cfg.blend_noise,
            transfer_cfg.posterior, transfer_cfg.guidance_reduction) == ("bicubic", False, "fresh", "sample", "mean")
    paper, paper_t = learn_config("paper"), transfer_config("paper")
    assert (paper.context_form, paper.start_token_grad, paper.mask_antialias, paper.context_border,
            paper.soft_mask_form, paper.posterior, paper.image_fit, paper.binary_masks, paper.roi_prompts) == \
        ("paper", True, True, 0, "affine", "mean", "crop", True, ())
    assert (paper_t.blend_mask, paper_t.guidance_attention_grad, paper_t.blend_noise, paper_t.posterior,
            paper_t.guidance_reduction) == ("any", True, "once", "mean", "sum")


# ---------------------------------------------------------------------------------------------- end to end


class ExplicitAttention:
    """Attention written out: softmax(Q K^T * scale) V per head (diffusers' head split), the probabilities kept in
    ``probs`` ``(B * heads, N, L)``. ``start_grad=False``: a gradient hook zeroes what flows into the start token's
    key and value rows; ``output_grad=False``: the output is cut from the graph."""

    def __init__(self, start_grad: bool = True, output_grad: bool = True):
        self.start_grad, self.output_grad, self.probs = start_grad, output_grad, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if not self.start_grad and encoder_hidden_states is not None:
            keep = torch.ones_like(k)
            keep[:, 0] = 0
            k.register_hook(lambda g: g * keep)
            v.register_hook(lambda g: g * keep)
        q, k, v = (attn.head_to_batch_dim(x) for x in (q, k, v))
        self.probs = (q @ k.transpose(1, 2) * attn.scale).softmax(-1)
        out = attn.batch_to_head_dim(self.probs @ v)
        if not self.output_grad:
            out = out.detach()
        return attn.to_out[1](attn.to_out[0](out))


def _up_map(procs: dict, index: int, hw: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w)``: the mean over the up-block cross-attention layers of token ``index``'s probabilities, averaged
    over heads and resized bilinearly to ``hw``."""
    maps = []
    for name, proc in procs.items():
        if name.startswith("up_blocks") and ".attn2." in name:
            heads = proc.heads
            p = proc.probs.unflatten(0, (-1, heads))[..., index].mean(1)             # (B, N)
            side = int(math.isqrt(p.shape[-1]))
            maps.append(F.interpolate(p.reshape(-1, 1, side, side), size=hw, mode="bilinear", align_corners=False))
    return torch.stack(maps).mean(0)[:, 0]


def _install_explicit(unet, **kw) -> dict:
    """ExplicitAttention on every attention layer (with ``heads`` for the maps); returns ``{name: processor}``."""
    modules = dict(unet.named_modules())
    procs = {}
    for name in unet.attn_processors:
        procs[name] = ExplicitAttention(**kw)
        procs[name].heads = modules[name.removesuffix(".processor")].heads
    unet.set_attn_processor(dict(procs))
    return procs


def _soft_mask_64():
    """A soft mask: 1 on a square, 0.6 on two rows above it, 0.04 on two rows below it."""
    m = square_mask()
    m[:, 6:8, 40:56] = 0.6
    m[:, 24:26, 40:56] = 0.04
    return m


def _official_first_step(backbone, image, mask, draws, prompt, template):
    """The official learning step written out: (loss terms, gradients of the total) for the token row and every
    cross-attention layer's to_k, to_v, to_q, to_out weights (and bias), in the layers' order."""
    unet, vae, sf = backbone.unet, backbone.vae, backbone.vae.config.scaling_factor
    flip = draws["1/flip"] < 0.5
    img, m = (image.flip(-1), mask.flip(-1)) if flip else (image, mask)
    eps, t = draws["1/eps"], torch.tensor([draws["1/t"]])
    with restored_model(backbone):
        add_placeholders(backbone, ["<v*>"], base_table(backbone.text_encoder)[42170][None])
        row = concept_embedding(backbone.text_encoder).new
        row.requires_grad_(True)
        procs = {n: p for n, p in _install_explicit(unet, start_grad=False).items() if ".attn2." in n}
        modules = dict(unet.named_modules())
        weights = []
        for name in procs:
            attn = modules[name.removesuffix(".processor")]
            weights += [attn.to_k.weight, attn.to_v.weight, attn.to_q.weight, attn.to_out[0].weight,
                        attn.to_out[0].bias]
        for w in weights:
            w.requires_grad_(True)
        with torch.no_grad():
            post = vae.encode(img[None]).latent_dist
            x0 = (post.mean + post.std * draws["1/z"]) * sf
            post = vae.encode((img * m)[None]).latent_dist
            x0_roi = (post.mean + post.std * draws["1/z_roi"]) * sf
        a = backbone.training_scheduler().alphas_cumprod[t].reshape(1, 1, 1, 1)
        x_t, x_t_roi = a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * x0_roi + (1 - a).sqrt() * eps
        hw = tuple(x0.shape[-2:])
        att_mask = F.interpolate(m[None], size=hw, mode="bilinear", align_corners=False)     # (1, 1, h, w)
        context_mask = torch.where(att_mask < 0.05, torch.full_like(att_mask, 0.25), att_mask)
        context_mask[..., 0, :] = context_mask[..., -1, :] = context_mask[..., :, 0] = context_mask[..., :, -1] = 0
        ids = backbone.tokenize(prompt)
        index = int((ids[0] == backbone.tokenizer.convert_tokens_to_ids("<v*>")).nonzero()[0])
        pred = unet(x_t, t, backbone.encode_text(ids).hidden).sample
        ca = _up_map(procs, index, hw)
        ca = (ca - ca.min()) / (ca.max() - ca.min())
        l_att = ((ca - att_mask[0]) ** 2).mean()
        roi_text = backbone.encode_text(backbone.tokenize(template.format(token="<v*>"))).hidden
        pred_roi = unet(x_t_roi, t, roi_text).sample
        l_con = (context_mask * (pred - eps) ** 2).sum() / context_mask.sum()
        l_roi = (att_mask * (pred_roi - eps) ** 2).sum() / att_mask.sum()
        loss = 0.5 * l_con + 0.25 * l_att + 0.25 * l_roi
        grads = torch.autograd.grad(loss, [row] + weights)
    return {"l_con": l_con.item(), "l_att": l_att.item(), "l_roi": l_roi.item(), "loss": loss.item()}, grads


def test_official_learning_step_equals_the_official_computation(backbone, monkeypatch):
    """Every loss term within 1e-4 and the same gradient (cosine >= 0.9999) as the official learning step computed
    here, on a soft mask (floor, border, plain resize all matter), a flipped image, a posterior sample, RoI prompt 3."""
    image, mask = random_image(seed=3), _soft_mask_64()
    g = torch.Generator().manual_seed(11)
    draws = {"1/image": 0, "1/flip": 0.25, "1/t": 400, "1/eps": torch.randn(1, 4, 16, 16, generator=g),
             "1/roi_prompt/0": 3, "1/z": torch.randn(1, 4, 16, 16, generator=g),
             "1/z_roi": torch.randn(1, 4, 16, 16, generator=g)}
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        seen.append([p.grad.detach().clone() for p in params])
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = learn_config("official", steps=1, object_class="chair")
    ours = learn(backbone, [image], [mask], cfg, draws=ReplayedDraws(draws), progress=False).history[0]
    want, grads = _official_first_step(backbone, image, mask, draws, "a chair with <v*> style", OFFICIAL_ROI_PROMPTS[3])
    for term in ("l_con", "l_att", "l_roi", "loss"):
        assert ours[term] == pytest.approx(want[term], rel=1e-4), term
    (got,) = seen
    assert len(got) == len(grads) and all(a.shape == b.shape for a, b in zip(got, grads))
    flat = lambda gs: torch.cat([x.flatten() for x in gs])                     # noqa: E731
    assert F.cosine_similarity(flat(got), flat(grads), dim=0) >= 0.9999
    assert F.cosine_similarity(got[0].flatten(), grads[0].flatten(), dim=0) >= 0.9999       # the token row alone


def _official_transfer(backbone, row, prompt, target, mask, draws, early, steps=10, replace=3, blend_last=7,
                       guided_below=5):
    """The official transfer loop written out, every step from the first: the latent after each step."""
    unet, sf = backbone.unet, backbone.vae.config.scaling_factor
    scheduler = DDIMScheduler.from_config(backbone.scheduler_config, clip_sample=False)
    scheduler.set_timesteps(steps)
    grey = np.round(mask[0].numpy() * 255).astype(np.uint8)
    m = torch.from_numpy(np.asarray(Image.fromarray(grey).resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255)
    out = {}
    with restored_model(backbone):
        add_placeholders(backbone, ["<v*>"], row[None])
        procs = _install_explicit(unet, output_grad=False)
        with torch.no_grad():
            post = backbone.vae.encode(target[None]).latent_dist
            x_tg = (post.mean + post.std * draws["target"]) * sf
            ids = backbone.tokenize(prompt)
            cond, uncond = backbone.encode_text(ids).hidden, backbone.encode_text(backbone.tokenize("")).hidden
        index = int((ids[0] == backbone.tokenizer.convert_tokens_to_ids("<v*>")).nonzero()[0])
        latents = draws["initial"]
        for i, t in enumerate(scheduler.timesteps):
            if i <= blend_last:
                noisy = scheduler.add_noise(x_tg, {**early, **draws}[f"{i}/blend"], t)
                latents = noisy if i < replace else noisy * (1 - m) + latents * m
            if i < guided_below:
                latents = latents.detach().requires_grad_(True)
                adam = torch.optim.Adam([latents], lr=0.01)
                unet(latents, t, cond)
                loss = ((_up_map(procs, index, (16, 16)) - 1) ** 2).mean()
                loss.backward()
                adam.step()
                latents = latents.detach()
            with torch.no_grad():
                e_u, e_c = unet(torch.cat([latents] * 2), t, torch.cat([uncond, cond])).sample.chunk(2)
                e = e_u + 7.5 * (e_c - e_u)
                var = {**early, **draws}[f"{i}/variance"]
                latents = scheduler.step(e, t, latents, eta=1.0, variance_noise=var).prev_sample
            out[i] = latents
    return out


def test_official_transfer_matches_the_official_loop_step_by_step(backbone):
    """The official recipe's transfer (replace 3 of 10 steps, blend up to step 7, Adam guidance on the first 5 with
    no gradient through attention outputs, fresh blending noise, a posterior sample of x_tg, a soft bicubic mask, DDIM
    eta 1) and the official loop written out, run from step 0 (its first steps are overwritten): the same latents
    after every step, given the same draws."""
    target, mask = random_image(seed=4), _soft_mask_64()
    row = base_table(backbone.text_encoder)[backbone.tokenizer.convert_tokens_to_ids("pattern</w>")].clone()
    concept = Concept.untrained(["<v*>"], row[None])
    cfg = transfer_config("official", steps=10, replace_steps=3, blend_until=8, guidance_range=(0, 5), seeds=(2,),
                          prompt="a chair with <v*> style")
    record, ours = RecordedDraws(SeededDraws(2)), {}
    transfer(backbone, concept, target, mask, cfg, progress=False, draws=lambda seed: record,
             callback=lambda info: ours.setdefault(info["step"], info["latents"].clone()))
    assert sorted(ours) == list(range(2, 10))
    g = torch.Generator().manual_seed(5)
    early = {f"{i}/{kind}": torch.randn(1, 4, 16, 16, generator=g) for i in (0, 1) for kind in ("blend", "variance")}
    theirs = _official_transfer(backbone, row, cfg.prompt, target, mask, record.record, early)
    for i in range(2, 10):
        torch.testing.assert_close(ours[i], theirs[i], rtol=1e-4, atol=1e-4, msg=f"step {i}")
    assert not torch.allclose(theirs[9], theirs[8])


# ---------------------------------------------------------------------------------------------- the draws


def test_recorded_draws_replay_a_run_and_feed_another_recipe(backbone, tmp_path):
    """A run's draws, recorded and saved, replay the same run; replayed into the paper recipe they give it the
    official run's timesteps (and the paper recipe's own losses)."""
    kw = dict(steps=2, object_class="chair", lr=1e-3)
    record = RecordedDraws(SeededDraws(7))
    official = learn(backbone, [random_image()], [square_mask()], learn_config("official", **kw), draws=record,
                     progress=False)
    assert sorted(record.record) == sorted(f"{s}/{n}" for s in (1, 2)
                                           for n in ("image", "flip", "t", "eps", "roi_prompt/0", "z", "z_roi"))
    replayed = learn(backbone, [random_image()], [square_mask()], learn_config("official", **kw),
                     draws=ReplayedDraws.load(record.save(tmp_path / "draws.safetensors")), progress=False)
    assert replayed.history == official.history
    assert torch.equal(replayed.concept.embeddings, official.concept.embeddings)
    paper = learn(backbone, [random_image()], [square_mask()], learn_config("paper", **kw),
                  draws=ReplayedDraws(record), progress=False)
    assert [r["t"] for r in paper.history] == [r["t"] for r in official.history]
    with pytest.raises(InputError, match="no recorded draw named '1/z'"):
        learn(backbone, [random_image()], [square_mask()], learn_config("official", **kw),
              draws=ReplayedDraws({k: v for k, v in record.record.items() if k != "1/z"}), progress=False)


def test_compare_script(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """scripts/compare_recipes.py: both recipes on the same draws, side by side; the draws written for replay."""
    image = _png(tmp_path / "i.png", (random_image().permute(1, 2, 0).numpy() + 1) * 127.5)
    mask = _png(tmp_path / "m.png", square_mask()[0].numpy() * 255)
    draws = tmp_path / "draws.safetensors"
    monkeypatch.setattr(sys, "argv", ["compare_recipes.py", "--model", tiny_model_dir, "--image", image, "--mask",
                                      mask, "--object-class", "chair", "--save-draws", str(draws)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "scripts" / "compare_recipes.py"), run_name="__main__")
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "t", "recipe", "loss", "l_con", "l_att", "l_roi"]
    (_, t1, r1, *_), (_, t2, r2, *_) = (line.split() for line in lines[1:])
    assert (r1, r2) == ("official", "paper") and t1 == t2
    assert "1/z" in ReplayedDraws.load(draws).record


# ---------------------------------------------------------------------------------------------- command line


def test_cli_official_learn_and_transfer_on_soft_masks(tiny_model_dir, tmp_path):
    """`clic learn --recipe official` reads a non-square image stretched and its grey mask soft; `clic transfer
    --recipe official` blends with the mask file resized bicubic to the latent."""
    rng = np.random.default_rng(0)
    image = _png(tmp_path / "i.png", rng.integers(0, 256, (64, 96, 3)))
    mask = np.zeros((64, 96))
    mask[10:30, 40:70] = 255
    mask[30:34, 40:70] = 100
    mask = _png(tmp_path / "m.png", mask)
    out = tmp_path / "c.safetensors"
    model = ["--model", tiny_model_dir]
    assert main(["learn", "--image", image, "--mask", mask, "--object-class", "chair", "--out", str(out),
                 "--recipe", "official", "--steps", "1", "-q", *model]) == 0
    meta = Concept.load(out).meta
    assert meta["config"]["image_fit"] == "stretch" and meta["config"]["initializer"] == "piece:ktn"
    target = _png(tmp_path / "t.png", rng.integers(0, 256, (64, 64, 3)))
    tmask = np.zeros((64, 64))
    tmask[8:24, 40:56] = 255
    assert main(["transfer", str(out), "--target", target, "--mask", _png(tmp_path / "tm.png", tmask), "--out",
                 str(tmp_path / "t"), "--recipe", "official", "--steps", "4", "--replace-steps", "2", "-q",
                 *model]) == 0
    assert (tmp_path / "t" / "seed0.png").exists()


def test_official_loops_wait_for_the_device_only_to_read_the_losses(micro_model_dir, micro_concept, monkeypatch):
    """With every model on the meta device (no values anywhere), the official recipe's learning loop reads only its
    loss values (after steps 1, 3 and 4 of 4 with sync_every 3) and its transfer loop nothing between steps: the
    posterior samples, RoI prompts, valid region, fresh blending noise and DDIM noise all stay on the device."""
    from conftest import DeviceReads, on_meta

    from clic.models import load_backbone

    monkeypatch.setattr(Concept, "check_base", lambda *a, **kw: None)       # reads weight statistics: set-up
    monkeypatch.setattr(Concept, "from_training", lambda *a, **kw: None)    # reads the weights: not the loop
    backbone = on_meta(load_backbone(micro_model_dir, device="cpu"))
    mode, marks, seen = DeviceReads(), {}, []
    with mode:
        learn(backbone, [random_image()], [_soft_mask_64()],
              learn_config("official", steps=4, object_class="chair", sync_every=3), progress=False,
              callback=lambda step, record: marks.setdefault(step, mode.reads))
        transfer(backbone, micro_concept, random_image(), _soft_mask_64(),
                 transfer_config("official", steps=6, replace_steps=2, guidance_range=(0, 4)), progress=False,
                 callback=lambda info: seen.append(mode.reads))
    assert marks == {1: 1, 2: 2, 3: 2, 4: 3}
    assert len(seen) == 5 and len(set(seen)) == 1
