"""The losses of in-context concept learning (paper sec. 3.1), named after the equations.

Shapes: latents/noise ``(B, C, h, w)``; masks ``(B, 1, h, w)`` in [0, 1] at the same resolution;
attention maps ``(B, h', w')`` with a mask of the same size.

Where the official code differs from the paper both forms are here; the paper's is the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


#: the official code's soft mask: mask values below this become alpha (:func:`soft_mask`, ``form="floor"``)
FLOOR_BELOW = 0.05


def soft_mask(mask: torch.Tensor, alpha: float = 0.5, form: str = "affine") -> torch.Tensor:
    """Eq. 2: M_soft = alpha + (1 - alpha) M_s (``form="affine"``).

    ``form="floor"`` is the official code's: values of the (resized) mask below 0.05 become alpha, the others are
    kept. Both give alpha outside and 1 inside a binary mask; on a soft mask the floor keeps a value of 0.1 at 0.1
    (below alpha), where eq. 2 raises it to alpha + 0.1 (1 - alpha).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if form == "affine":
        return alpha + (1.0 - alpha) * mask
    if form == "floor":
        return torch.where(mask < FLOOR_BELOW, torch.full_like(mask, alpha), mask)
    raise ValueError(f"unknown soft mask form {form!r} (affine | floor)")


def valid_region(hw: tuple[int, int], border: int, device=None) -> torch.Tensor:
    """``(1, 1, h, w)``: 1 inside, 0 on the outer ``border`` cells of the latent. The official code multiplies its
    context mask by such a mask (its rescale augmentation's valid region, which without the augmentation is the
    latent less its outer ring)."""
    h, w = hw
    region = torch.zeros(1, 1, h, w, device=device)
    region[..., border:h - border, border:w - border] = 1.0
    return region


def context_loss(eps_pred: torch.Tensor, eps: torch.Tensor, m_soft: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Eq. 3: l_con = E || M_soft * (eps_theta(x_t, c, t) - eps) ||^2.

    ``form="paper"``: the mask is inside the norm, so each element is weighted by M_soft^2, averaged over all
    elements. ``form="official"``: the official code's sum over pixels and latent channels of
    M_soft (eps_hat - eps)^2, divided by the sum of the one-channel ``m_soft`` ``(B, 1, h, w)`` over its pixels
    (not over the channels too: with C = 4 latent channels the value is C times the per-element weighted mean).
    """
    diff2 = (eps_pred.float() - eps.float()) ** 2
    if form == "paper":
        return (m_soft.float().expand_as(diff2) ** 2 * diff2).mean()
    if form == "official":
        return masked_sum(diff2, m_soft) / m_soft.float().sum()
    raise ValueError(f"unknown context loss form {form!r} (paper | official)")


def masked_sum(diff2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum of ``weight (B, 1, h, w) * diff2 (B, C, h, w)`` over every element (the weight broadcast over C)."""
    return (weight.float() * diff2).sum()


def attention_loss(ca_map: torch.Tensor, mask: torch.Tensor, normalize: str = "none") -> torch.Tensor:
    """Eq. 1: l_att = E || CA_theta(v*, x_t) - Resize(M_s) ||^2 (mean over pixels).

    ``normalize`` rescales each map before the comparison: ``"none"`` (paper), ``"minmax"`` (official CLiC
    code) or ``"max"`` (Break-A-Scene divides by the map's maximum).
    """
    ca_map = ca_map.float()
    dims = tuple(range(1, ca_map.ndim))
    if normalize == "minmax":
        lo, hi = ca_map.amin(dims, keepdim=True), ca_map.amax(dims, keepdim=True)
        ca_map = (ca_map - lo) / (hi - lo + 1e-8)
    elif normalize == "max":
        ca_map = ca_map / (ca_map.amax(dims, keepdim=True) + 1e-8)
    elif normalize != "none":
        raise ValueError(f"unknown attention normalisation {normalize!r} (none | minmax | max)")
    return F.mse_loss(ca_map, mask.float().reshape(ca_map.shape))


def roi_loss(eps_pred_roi: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4: l_RoI = E || eps_theta(M_s * x_t, c*, t) - eps ||^2 with c* = "a photo of <v*>".

    The masking of the input happens before the UNet call (see :mod:`clic.learn`); here only the error.
    ``weight`` ``(B, 1, h, w)`` (the official code's variant): the error weighted by the mask, summed over pixels
    and latent channels, divided by the sum of the one-channel mask (as l_con's official form).
    """
    diff2 = (eps_pred_roi.float() - eps.float()) ** 2
    if weight is None:
        return diff2.mean()
    return masked_sum(diff2, weight) / weight.float().sum().clamp_min(1e-8)


def total_loss(l_con: torch.Tensor, l_att: torch.Tensor, l_roi: torch.Tensor, lambda_att: float = 0.5,
               lambda_roi: float = 0.5, lambda_con: float = 1.0) -> torch.Tensor:
    """Eq. 5: l_tot = l_con + lambda_att l_att + lambda_RoI l_RoI (official weights: 0.5, 0.25, 0.25)."""
    return lambda_con * l_con + lambda_att * l_att + lambda_roi * l_roi


def masked_diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Break-A-Scene's masked loss: prediction and target multiplied by the mask, plain mean (not area-normalised)."""
    mask = mask.float().expand_as(eps_pred)
    return F.mse_loss(eps_pred.float() * mask, eps.float() * mask)
