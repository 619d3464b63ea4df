"""The four distillation losses of the method, batched with padding masks, and an optional
feature-preservation term that keeps the encoder close to what its VLM was trained with.

Shapes: B pairs, N matches per pair (padded; `mask` [B, N] marks real ones), D feature channels, P cells of
the teacher's cost-volume grid, K kept teacher entries per row.

Units: depths and 3D points given to these functions must already be scene-normalised (divided by the
pair's median match depth in view A, see `DistillModel`), so the thresholds `neg_distance` and `min_gap`
are fractions of the scene depth for every teacher, metric or relative.

Reduction: each loss is averaged over its terms within a pair (or image), then over the pairs that have
at least one term, so a pair's weight does not depend on how many matches it has; a batch without any
term contributes 0 (with a gradient path, so DDP and the optimizer see every parameter).
"""

from __future__ import annotations

import torch
from torch import nn


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (bf16 autocast) are computed in float32; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_pair_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the trailing axes per pair (weights 0/1), then over pairs with any weight."""
    dims = tuple(range(1, values.dim()))
    count = weights.sum(dim=dims)
    per_pair = (values * weights).sum(dim=dims) / count.clamp(min=1)
    has = (count > 0).to(values.dtype)
    return (per_pair * has).sum() / has.sum().clamp(min=1)


def smooth_ap_loss(feat_a: torch.Tensor, feat_b: torch.Tensor, points_a: torch.Tensor, points_b: torch.Tensor,
                   mask: torch.Tensor, *, temperature: float = 0.01, neg_distance: float = 0.1) -> torch.Tensor:
    """Smooth-AP matching loss.

    feat_a, feat_b [B, N, D] unit vectors at matched keypoints (match i of A corresponds to i of B);
    points_a, points_b [B, N, 3] the matches' 3D points in one frame (scene-normalised). With
    s_ij = cos(fA_i, fB_j), sig(x) = sigmoid(x / temperature) and negatives
    Neg_ij = [|XA_i - XB_j| > neg_distance] and i != j (both real):
      AP1_i = (1 + sig(s_ii - 1)) / (1 + sig(s_ii - 1) + sum_j Neg_ij sig(s_ij - 1))
      AP2_i = (1 + sig(1 - s_ii)) / (1 + sig(1 - s_ii) + sum_j Neg_ij sig(s_ij - s_ii))
      loss = mean_i (1 - (AP1_i + AP2_i) / 2).
    """
    feat_a, feat_b = _wide(feat_a), _wide(feat_b)
    sim = feat_a @ feat_b.transpose(1, 2)  # [B, N, N]
    pos = sim.diagonal(dim1=1, dim2=2)  # [B, N]
    count = mask.shape[1]
    eye = torch.eye(count, dtype=torch.bool, device=sim.device)
    real = mask[:, :, None] & mask[:, None, :]
    negatives = (torch.cdist(_wide(points_a), _wide(points_b)) > neg_distance) & real & ~eye
    negatives = negatives.to(sim.dtype)

    def sig(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x / temperature)

    top1 = 1 + sig(pos - 1)
    ap1 = top1 / (top1 + (negatives * sig(sim - 1)).sum(-1))
    top2 = 1 + sig(1 - pos)
    ap2 = top2 / (top2 + (negatives * sig(sim - pos[:, :, None])).sum(-1))
    return _masked_pair_mean(1 - (ap1 + ap2) / 2, mask.to(sim.dtype))


def cross_view_depth_loss(head: nn.Module, feat_a: torch.Tensor, feat_b: torch.Tensor, depth_a: torch.Tensor,
                          depth_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_i |head(fA_i - fB_i) - tanh(dA_i - dB_i)| over real matches (depths scene-normalised).

    feat_a, feat_b [B, N, D] depth features at the matched keypoints; depth_a, depth_b [B, N] each view's
    depth of the match in its own camera.
    """
    predicted = head(_wide(feat_a) - _wide(feat_b))
    error = (predicted - torch.tanh(_wide(depth_a) - _wide(depth_b))).abs()
    return _masked_pair_mean(error, mask.to(error.dtype))


def ranking_loss(head: nn.Module, features: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor, *,
                 min_gap: float = 0.05) -> torch.Tensor:
    """Intra-view depth ranking: mean over ordered point pairs (i, j) of one image with |d_j - d_i| > min_gap
    of log(1 + exp(-sign(d_j - d_i) * head(f_j - f_i))).

    features [B, N, D], depth [B, N] (scene-normalised), mask [B, N]. The head's first Linear is applied to
    each feature before the differences are taken (see DepthHead), so memory is N^2 x hidden, not N^2 x D;
    the result equals the direct form exactly (up to float rounding).
    """
    projected = head.project(_wide(features))  # [B, N, H]
    difference = projected[:, None, :, :] - projected[:, :, None, :]  # [b, i, j] = p_j - p_i
    score = head.from_projected(difference)  # [B, N, N]
    gap = _wide(depth)[:, None, :] - _wide(depth)[:, :, None]  # d_j - d_i
    weights = ((gap.abs() > min_gap) & mask[:, :, None] & mask[:, None, :]).to(score.dtype)
    loss = nn.functional.softplus(-torch.sign(gap) * score)
    return _masked_pair_mean(loss, weights)


def cost_volume_kl(cells_a: torch.Tensor, cells_b: torch.Tensor, index: torch.Tensor, prob: torch.Tensor,
                   valid: torch.Tensor, *, temperature: float = 0.05) -> torch.Tensor:
    """KL(teacher || student) per valid row of A's cost-volume grid, averaged over rows then pairs.

    cells_a, cells_b [B, P, D] unit student features at the teacher grid's cell centres; index [B, P, K]
    (long) the teacher's top-k cells of B for each cell of A, prob [B, P, K] their probabilities; valid
    [B, P]. The teacher row is renormalised over its kept mass (rows with no mass are skipped); the
    student row is softmax(cos(a_p, b_q) / temperature) over all P cells of B.
    """
    logits = (_wide(cells_a) @ _wide(cells_b).transpose(1, 2)) / temperature  # [B, P, P]
    weight, coef, entropy = _teacher_terms(prob, valid, logits.dtype)
    picked = logits.gather(-1, index.long()).flatten(1)  # [B, P * K]
    return (weight * torch.logsumexp(logits, dim=-1)).sum() - (coef * picked).sum() + entropy


def two_way_cost_volume_kl(cells_a: torch.Tensor, cells_b: torch.Tensor, ab: tuple, ba: tuple, *,
                           temperature: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """`cost_volume_kl` in both directions, (A->B, B->A), from one logits matrix.

    ab and ba are (index, prob, valid) as in `cost_volume_kl`. The B->A student rows are the columns of the
    A->B cosine matrix, so one product serves both directions (three matrix products with the backward
    instead of six). Each row's log-softmax is its logits minus the row's logsumexp, so only the K picked
    logits and one logsumexp per row and per column are needed, and the gradient of the logits is written
    in one pass (`_TwoWaySparseKL`) rather than assembled by autograd from a dense scatter and several
    [B, P, P] intermediates.
    """
    logits = (_wide(cells_a) @ _wide(cells_b).transpose(1, 2)) / temperature  # [B, P_a, P_b]
    width = logits.shape[-1]
    rows_ab = torch.arange(logits.shape[1], device=logits.device)[None, :, None]
    cols_ba = torch.arange(width, device=logits.device)[None, :, None]
    # Positions in the flattened [B, P_a * P_b] logits: A->B row p picks (p, index); B->A row q picks (index, q).
    flat_ab = (rows_ab * width + ab[0].long()).flatten(1)
    flat_ba = (ba[0].long() * width + cols_ba).flatten(1)
    weight_ab, coef_ab, entropy_ab = _teacher_terms(ab[1], ab[2], logits.dtype)
    weight_ba, coef_ba, entropy_ba = _teacher_terms(ba[1], ba[2], logits.dtype)
    kl_ab, kl_ba = _TwoWaySparseKL.apply(logits, flat_ab, coef_ab, weight_ab, flat_ba, coef_ba, weight_ba)
    return kl_ab + entropy_ab, kl_ba + entropy_ba


def _teacher_terms(prob: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> tuple:
    """The teacher's side of `cost_volume_kl`'s average as constants: (row weight [B, P], picked-logit
    coefficients [B, P * K], the entropy part sum_rows w * sum_k t log t). A row's weight is its share of the
    average (1 / rows of its pair / pairs with rows, 0 for skipped rows), so the loss is
    sum_rows w * logsumexp - sum_{rows, k} w * t_k * picked_k + entropy."""
    prob = prob.detach().to(dtype)
    mass = prob.sum(-1, keepdim=True)
    teacher = prob / mass.clamp(min=1e-12)
    rows = (valid & (mass.squeeze(-1) > 0)).to(dtype)
    count = rows.sum(-1, keepdim=True)
    has = (count > 0).to(dtype)
    weight = rows / count.clamp(min=1) * has / has.sum().clamp(min=1)  # [B, P]
    entropy = (weight * torch.xlogy(teacher, teacher).sum(-1)).sum()
    # Rows kept by the teacher have sum_k t_k = 1, so w is also the logsumexp's coefficient.
    return weight, (weight[..., None] * teacher).flatten(1), entropy


class _TwoWaySparseKL(torch.autograd.Function):
    """(sum_p w_p lse_row_p - sum c * picked, sum_q w_q lse_col_q - sum c * picked) of a logits matrix
    [B, P_a, P_b], with picked the logits at flat positions; the backward writes
    g_ab * softmax_row * w_ab + g_ba * softmax_col * w_ba minus the picked coefficients in one pass."""

    @staticmethod
    def forward(ctx, logits, flat_ab, coef_ab, weight_ab, flat_ba, coef_ba, weight_ba):
        lse_row, lse_col = torch.logsumexp(logits, dim=-1), torch.logsumexp(logits, dim=-2)
        flat = logits.flatten(1)
        kl_ab = (weight_ab * lse_row).sum() - (coef_ab * flat.gather(1, flat_ab)).sum()
        kl_ba = (weight_ba * lse_col).sum() - (coef_ba * flat.gather(1, flat_ba)).sum()
        ctx.save_for_backward(logits, lse_row, lse_col, flat_ab, coef_ab, weight_ab, flat_ba, coef_ba, weight_ba)
        return kl_ab, kl_ba

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ab, grad_ba):
        logits, lse_row, lse_col, flat_ab, coef_ab, weight_ab, flat_ba, coef_ba, weight_ba = ctx.saved_tensors
        grad = (torch.exp(logits - lse_row[..., None]) * (grad_ab * weight_ab)[..., None]
                + torch.exp(logits - lse_col[:, None, :]) * (grad_ba * weight_ba)[:, None, :])
        picked = torch.cat([flat_ab, flat_ba], dim=1)
        coefs = torch.cat([grad_ab * coef_ab, grad_ba * coef_ba], dim=1)
        grad = grad.flatten(1).scatter_add(1, picked, -coefs).view_as(logits)
        return grad, None, None, None, None, None, None


def feature_preservation_loss(student: torch.Tensor, base: torch.Tensor, *,
                              distance: str = "cosine") -> torch.Tensor:
    """How far the student's patch features moved from the frozen base model's, averaged over patches.

    student, base [B, D, h, w]: the same layer's patch grids of the distilled and the untouched encoder
    (base carries no gradient). Per patch token t (a D-vector):
      "cosine":       1 - cos(s_t, b_t)                      (direction only; 0 = unchanged, max 2)
      "relative_mse": |s_t - b_t|^2 / mean_t' |b_t'|^2       (squared distance relative to the image's mean
                                                              squared base norm, so the value does not depend
                                                              on the encoder's feature scale)
    The per-token values are averaged over the tokens of each image, then over images.
    """
    student, base = _wide(student), _wide(base).detach()
    if student.shape != base.shape:
        raise ValueError(f"feature_preservation_loss: student {tuple(student.shape)} vs base {tuple(base.shape)}")
    if distance == "cosine":
        per_token = 1 - nn.functional.cosine_similarity(student, base, dim=1, eps=1e-8)  # [B, h, w]
    elif distance == "relative_mse":
        squared = (student - base).pow(2).sum(1)  # [B, h, w]
        reference = base.pow(2).sum(1).mean(dim=(1, 2), keepdim=True).clamp(min=1e-12)
        per_token = squared / reference
    else:
        raise ValueError(f"feature_preservation_loss: unknown distance {distance!r} (cosine, relative_mse)")
    return per_token.mean(dim=(1, 2)).mean()
