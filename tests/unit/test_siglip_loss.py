"""SigLIP's sigmoid loss for re-alignment: a value worked out by hand, open_clip's SigLipLoss, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from open_clip.loss import SigLipLoss

from stages.training.losses import siglip_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_siglip_loss_by_hand():
    img = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised inside: rows x and y
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-5.0))
    # cosines [[1, .6], [0, .8]] -> logits 10 cos - 5 = [[5, 1], [-5, 3]]; labels +1 diagonal, -1 elsewhere
    want = -(_log_sigmoid(5) + _log_sigmoid(-1) + _log_sigmoid(5) + _log_sigmoid(3)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_siglip_loss_equals_open_clips_siglip_loss():
    torch.manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for _ in range(2))
    scale, bias = torch.tensor(7.0), torch.tensor(-3.0)  # open_clip's loss takes normalised features
    want = SigLipLoss()(img, txt, scale, bias).item()
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(want, rel=1e-6)


def test_siglip_loss_half_precision_inputs_and_gradients():
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    full = siglip_loss(img, txt, 10.0, -10.0)
    half = siglip_loss(img.bfloat16(), txt.bfloat16(), 10.0, -10.0)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=0.05)
    d = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(4, 5, **d), torch.randn(4, 5, **d), torch.tensor(3.0, **d), torch.tensor(-1.0, **d))
    assert torch.autograd.gradcheck(siglip_loss, args)
