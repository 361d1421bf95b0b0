"""The MCIP losses as pure functions on tensors (shared/METHOD.md has every constant).

Each function L2-normalises its embedding inputs itself and computes in float32 (float64 stays
float64, for gradient checks) even when the inputs come from a half-precision forward pass.

    arc_margin_loss(emb, labels, proxies)              class proxies, ArcFace margin on the positive
    multi_caption_loss(img_emb, cap_emb, cap_owner)    several captions per image, soft targets
    clip_infonce_loss(img_emb, txt_emb, logit_scale)   symmetric CLIP loss for re-alignment
    siglip_loss(img_emb, txt_emb, logit_scale, logit_bias)   SigLIP's sigmoid loss, for re-aligning SigLIP
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE = 30.0
MARGIN = 0.1
MAX_TERM_WEIGHT = 0.1


def _full(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(_full(x), dim=-1)


def margin_cosine(cos: torch.Tensor, m: float = MARGIN) -> torch.Tensor:
    """phi(c) = cos(arccos(c) + m) where c > cos(pi - m), else c - m*sin(m) (ArcFace's fallback)."""
    sine = torch.sqrt((1.0 - cos * cos).clamp(min=1e-12))  # clamp: finite gradient at c = +-1
    shifted = cos * math.cos(m) - sine * math.sin(m)
    return torch.where(cos > math.cos(math.pi - m), shifted, cos - m * math.sin(m))


def _margin_logits(cos: torch.Tensor, positive: torch.Tensor, s: float, m: float) -> torch.Tensor:
    return s * torch.where(positive, margin_cosine(cos, m), cos)


def arc_margin_loss(
    emb: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, s: float = SCALE, m: float = MARGIN
) -> torch.Tensor:
    """Mean cross-entropy over classes; the true class's cosine gets the additive angular margin.

    emb [B, D], labels [B] (class indexes), proxies [C, D] (learnable, normalised here).
    """
    cos = _unit(emb) @ _unit(proxies).T
    positive = F.one_hot(labels, num_classes=proxies.shape[0]).bool()
    return F.cross_entropy(_margin_logits(cos, positive, s, m), labels)


def multi_caption_loss(
    img_emb: torch.Tensor,
    cap_emb: torch.Tensor,
    cap_owner: torch.Tensor,
    s: float = SCALE,
    m: float = MARGIN,
    max_term_weight: float = MAX_TERM_WEIGHT,
) -> torch.Tensor:
    """Multi-Caption ArcMargin, image -> text: every caption of the batch is a class.

    img_emb [B, D]; cap_emb [N, D] (from the frozen text tower); cap_owner [N] = the batch index of
    the image that owns caption k. Soft target q_ik = 1/n_i on the image's own captions (a zero row
    when it has none); loss_i = -sum_k q_ik log p_ik + w * max_k (1 - q_ik)(-log p_ik).
    """
    if cap_emb.shape[0] == 0:
        return _full(img_emb).sum() * 0.0
    cos = _unit(img_emb) @ _unit(cap_emb).T
    positive = cap_owner[None, :] == torch.arange(img_emb.shape[0], device=cap_owner.device)[:, None]
    neg_log_p = -F.log_softmax(_margin_logits(cos, positive, s, m), dim=1)
    owned = positive.sum(dim=1, keepdim=True)
    target = positive.to(cos.dtype) / owned.clamp(min=1).to(cos.dtype)
    per_image = (target * neg_log_p).sum(dim=1)
    if max_term_weight:
        per_image = per_image + max_term_weight * ((1.0 - target) * neg_log_p).max(dim=1).values
    return per_image.mean()


def clip_infonce_loss(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of image->text and text->image cross-entropy over the batch.

    `logit_scale` is the multiplier itself (already exponentiated, as open_clip's forward returns it).
    """
    logits = _full(torch.as_tensor(logit_scale)) * (_unit(img_emb) @ _unit(txt_emb).T)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (open_clip's SigLipLoss on the whole batch): every image-text
    pair is its own binary problem, label +1 on the diagonal and -1 elsewhere;
    logits = logit_scale * cos + logit_bias, loss = -sum log sigmoid(label * logit) / n (n images).

    `logit_scale` is the multiplier itself (already exponentiated), as in `clip_infonce_loss`.
    """
    cos = _unit(img_emb) @ _unit(txt_emb).T
    logits = _full(torch.as_tensor(logit_scale)) * cos + _full(torch.as_tensor(logit_bias))
    labels = 2 * torch.eye(*cos.shape, device=cos.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / cos.shape[0]
