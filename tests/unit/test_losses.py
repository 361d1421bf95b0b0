"""The MCIP losses against values worked out by hand on tiny tensors, plus gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from stages.training.losses import arc_margin_loss, clip_infonce_loss, margin_cosine, multi_caption_loss

S, M = 30.0, 0.1


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def test_margin_cosine_adds_the_angle_and_falls_back_past_pi_minus_m():
    assert margin_cosine(torch.tensor([0.5]))[0].item() == pytest.approx(
        math.cos(math.acos(0.5) + M), abs=1e-6
    )
    assert margin_cosine(torch.tensor([1.0]))[0].item() == pytest.approx(math.cos(M), abs=1e-6)
    near_minus_one = -0.999  # arccos > pi - m: the "not easy margin" fallback c - m sin(m)
    assert margin_cosine(torch.tensor([near_minus_one]))[0].item() == pytest.approx(
        near_minus_one - M * math.sin(M)
    )


def test_arc_margin_loss_by_hand():
    # image 0 along x, label 0; image 1 at 60 degrees (unnormalised), label 1; proxies x and y
    emb = torch.tensor([[2.0, 0.0], [1.0, math.sqrt(3.0)]])
    proxies = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    loss = arc_margin_loss(emb, torch.tensor([0, 1]), proxies, s=S, m=M)
    pos0, neg0 = S * math.cos(M), 0.0
    pos1, neg1 = S * math.cos(math.radians(30) + M), S * 0.5
    want = ((_lse([pos0, neg0]) - pos0) + (_lse([neg1, pos1]) - pos1)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_multi_caption_loss_by_hand_with_an_image_without_captions():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    caps = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])  # cosines with image 0: 1, .6, 0
    owner = torch.tensor([0, 0, 0])  # image 0 owns all three, image 1 none
    loss = multi_caption_loss(img, caps, owner, s=S, m=M, max_term_weight=0.1)
    logits0 = [S * math.cos(M), S * math.cos(math.acos(0.6) + M), S * math.cos(math.acos(0.0) + M)]
    nlp0 = [_lse(logits0) - v for v in logits0]
    loss0 = sum(nlp0) / 3 + 0.1 * max((1 - 1 / 3) * v for v in nlp0)
    logits1 = [0.0, S * 0.8, S * 1.0]  # image 1 owns nothing: plain scaled cosines, zero target
    nlp1 = [_lse(logits1) - v for v in logits1]
    loss1 = 0.0 + 0.1 * max(nlp1)
    assert loss.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-5)
    without_max = multi_caption_loss(img, caps, owner, s=S, m=M, max_term_weight=0.0)
    assert without_max.item() == pytest.approx(sum(nlp0) / 3 / 2, rel=1e-5)


def test_multi_caption_loss_without_captions_is_zero_and_keeps_the_graph():
    img = torch.randn(3, 4, requires_grad=True)
    loss = multi_caption_loss(img, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(img.grad, torch.zeros(3, 4))


def test_clip_infonce_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = 10.0
    loss = clip_infonce_loss(img, txt, torch.tensor(scale))
    # image->text rows: [10, 6], [0, 8]; text->image rows: [10, 0], [6, 8]
    i2t = (_lse([10, 6]) - 10) + (_lse([0, 8]) - 8)
    t2i = (_lse([10, 0]) - 10) + (_lse([6, 8]) - 8)
    assert loss.item() == pytest.approx((i2t / 2 + t2i / 2) / 2, rel=1e-6)


def test_half_precision_inputs_are_computed_in_float32():
    emb, proxies = torch.randn(4, 8), torch.randn(3, 8)
    labels = torch.tensor([0, 1, 2, 0])
    full = arc_margin_loss(emb, labels, proxies)
    half = arc_margin_loss(emb.bfloat16(), labels, proxies.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=0.05)


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    emb, proxies = torch.randn(4, 5, **d), torch.randn(3, 5, **d)
    labels = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda e, p: arc_margin_loss(e, labels, p, s=5.0), (emb, proxies))
    caps, owner = torch.randn(6, 5, **d), torch.tensor([0, 0, 1, 3, 3, 3])
    assert torch.autograd.gradcheck(
        lambda e, c: multi_caption_loss(e, c, owner, s=5.0, max_term_weight=0.0), (emb, caps)
    )
    txt, scale = torch.randn(4, 5, **d), torch.tensor(3.0, **d)
    assert torch.autograd.gradcheck(clip_infonce_loss, (emb, txt, scale))
