"""Cosine-classifier logits s · x̂ ŵᵀ and the fused cosine cross-entropy (autograd-capable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ltdist.kernels._dispatch import use_triton

from ltdist.labels import check_label_range


def cosine_logits_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eager PyTorch oracle. x [B,F], w [N,F], scale 0-d → logits [B,N] in x's dtype (math in fp32,
    or fp64 for fp64 inputs so that gradcheck applies)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    logits = scale.to(dt) * (F.normalize(x.to(dt), dim=1) @ F.normalize(w.to(dt), dim=1).T)
    return logits.to(x.dtype)


def cosine_cross_entropy_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                                   labels: torch.Tensor) -> torch.Tensor:
    """Eager oracle of the mean cross-entropy of the cosine logits; fp32 (fp64 for fp64 x) scalar."""
    logits = cosine_logits_reference(x, w, scale)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"cosine_logits: need x [B,F] and w [N,F] with equal F, got {tuple(x.shape)} "
                         f"and {tuple(w.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"cosine_logits: scale must be a 0-d tensor, got shape {tuple(scale.shape)}")


def cosine_logits(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """logits [B,N] = scale · cos(x_b, w_n); grads flow to x, w and scale.

    Triton (fused normalisation, fp32 accumulation) when the tensors are on CUDA, the
    reference otherwise or when ``LTDIST_KERNELS=reference``.
    """
    _check(x, w, scale)
    if use_triton("cosine_logits", x=x, w=w, scale=scale):
        from ltdist.kernels.cosine_logits_triton import CosineLogits

        return CosineLogits.apply(x, w, scale)
    return cosine_logits_reference(x, w, scale)


def cosine_cross_entropy(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``cosine_logits(x, w, scale)`` against labels [B] (int64); fp32 scalar.

    The Triton path never holds all B×N logits: it works on row chunks and computes the
    gradients during the forward pass.
    """
    _check(x, w, scale)
    if labels.shape != (x.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"cosine_cross_entropy: labels must be int64 [{x.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    fast = use_triton("cosine_cross_entropy", x=x, w=w, scale=scale, labels=labels)
    # the Triton kernel would read logits out of bounds: check what cross_entropy checks
    check_label_range(labels, w.shape[0], "cosine_cross_entropy: labels")
    if fast:
        from ltdist.kernels.cosine_logits_triton import CosineCrossEntropy

        return CosineCrossEntropy.apply(x, w, scale, labels)
    return cosine_cross_entropy_reference(x, w, scale, labels)
