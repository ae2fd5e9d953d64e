"""Each loss against a value computed by hand on small tensors."""

import pytest
import torch

from clic.losses import attention_loss, context_loss, masked_diffusion_loss, roi_loss, soft_mask, total_loss


def test_soft_mask_eq2():
    m = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert torch.equal(soft_mask(m, 0.5), torch.tensor([[0.5, 1.0], [1.0, 0.5]]))
    assert torch.equal(soft_mask(m, 0.25), torch.tensor([[0.25, 1.0], [1.0, 0.25]]))
    with pytest.raises(ValueError):
        soft_mask(m, 1.5)


def test_context_loss_paper_and_official_forms():
    eps_hat = torch.tensor([1.0, 2.0, 0.0, 4.0]).reshape(1, 1, 2, 2)
    eps = torch.tensor([0.0, 0.0, 0.0, 2.0]).reshape(1, 1, 2, 2)
    m_soft = torch.tensor([0.5, 1.0, 1.0, 0.5]).reshape(1, 1, 2, 2)
    # paper: mean((M (e_hat - e))^2) = ((0.5*1)^2 + (1*2)^2 + 0 + (0.5*2)^2) / 4 = (0.25 + 4 + 1) / 4
    assert context_loss(eps_hat, eps, m_soft, "paper").item() == pytest.approx(5.25 / 4)
    # official: sum(M (e_hat - e)^2) / sum(M) = (0.5*1 + 1*4 + 0 + 0.5*4) / 3
    assert context_loss(eps_hat, eps, m_soft, "official").item() == pytest.approx(6.5 / 3)


def test_context_loss_broadcasts_mask_over_channels():
    eps_hat = torch.ones(1, 4, 2, 2)
    eps = torch.zeros(1, 4, 2, 2)
    m = torch.tensor([1.0, 0.5, 0.5, 1.0]).reshape(1, 1, 2, 2)
    assert context_loss(eps_hat, eps, m).item() == pytest.approx((1 + 0.25 + 0.25 + 1) / 4)


def test_attention_loss_eq1_and_normalisations():
    ca = torch.tensor([[[0.1, 0.3], [0.0, 0.2]]])
    mask = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    # none: ((0.1)^2 + (0.7)^2 + 0 + (0.8)^2) / 4
    assert attention_loss(ca, mask).item() == pytest.approx((0.01 + 0.49 + 0.64) / 4)
    # minmax: [1/3, 1, 0, 2/3] vs [0, 1, 0, 1]
    assert attention_loss(ca, mask, "minmax").item() == pytest.approx(((1 / 3) ** 2 + (1 / 3) ** 2) / 4, rel=1e-5)
    # max: [1/3, 1, 0, 2/3] too (min is 0)
    assert attention_loss(ca, mask, "max").item() == pytest.approx(((1 / 3) ** 2 + (1 / 3) ** 2) / 4, rel=1e-5)


def test_roi_loss_eq4_plain_and_mask_weighted():
    pred = torch.tensor([2.0, 0.0, 1.0, 1.0]).reshape(1, 1, 2, 2)
    eps = torch.zeros(1, 1, 2, 2)
    assert roi_loss(pred, eps).item() == pytest.approx((4 + 0 + 1 + 1) / 4)
    w = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    assert roi_loss(pred, eps, w).item() == pytest.approx((4 + 0) / 2)


def test_total_loss_eq5():
    l = total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0))
    assert l.item() == pytest.approx(1 + 0.5 * 2 + 0.5 * 4)
    l = total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0), 0.25, 0.25, 0.5)
    assert l.item() == pytest.approx(0.5 + 0.25 * 2 + 0.25 * 4)


def test_masked_diffusion_loss_is_not_area_normalised():
    pred = torch.full((1, 1, 2, 2), 2.0)
    eps = torch.zeros(1, 1, 2, 2)
    m = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    assert masked_diffusion_loss(pred, eps, m).item() == pytest.approx(4 / 4)
