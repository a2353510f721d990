"""KT attention (paper 1, eqs. 4–7 and 9): knowledge transfer from data-rich classes.

For every threshold k and class i:
    α_ij  = softmax over {j : n_j > k} of τ · p̂_i · ŵ_j                    (eqs. 5, 6)
    w_kt  = Σ_j α_ij ŵ_j                                                    (eq. 4)
    w_h   = ŵ_kt/‖ŵ_kt‖ + p̂_i + ŵ_i,   w_hc = ŵ_kt/‖ŵ_kt‖ + p̂_i               (eqs. 7, 9)
(eqs. 7 and 9 normalise w_kt; ``x̂`` is ``x/‖x‖``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from ltdist.kernels._dispatch import use_triton


def check_kt_inputs(prototypes: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                    ks: Sequence[int]) -> None:
    """Raise ``ValueError`` naming what is wrong with the KT attention inputs."""
    if prototypes.dim() != 2 or prototypes.shape != weights.shape:
        raise ValueError(f"kt_attention: prototypes and weights must both be [N, F], got "
                         f"{tuple(prototypes.shape)} and {tuple(weights.shape)}")
    if counts.shape != (prototypes.shape[0],) or counts.dtype != torch.int64:
        raise ValueError(f"kt_attention: counts must be int64 of shape [{prototypes.shape[0]}], got "
                         f"{counts.dtype} {tuple(counts.shape)}")
    if len(ks) == 0:
        raise ValueError("kt_attention: ks is empty; give at least one threshold k")
    max_count = int(counts.max())
    for k in ks:
        if k >= max_count:
            raise ValueError(f"kt_attention: threshold k={k} leaves no class with n_j > k "
                             f"(max count is {max_count}); use k < {max_count}")


def compose(w_kt: torch.Tensor, p_hat: torch.Tensor,
            w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From unnormalised w_kt [K,N,F] and p̂, ŵ [N,F]: (w_h, w_hc), each [K,N,F] (eqs. 7, 9)."""
    w_hc = F.normalize(w_kt, dim=-1) + p_hat
    return w_hc + w_hat, w_hc


def kt_attention_reference(prototypes: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                           ks: Sequence[int], tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense PyTorch KT attention (the oracle).

    Args:
        prototypes: [N, F] class prototypes p_i (any norm).
        weights: [N, F] cosine-classifier weights w_i (any norm).
        counts: [N] int64 training counts n_i.
        ks: thresholds k; classes with n_j > k are attended to.
        tau: softmax temperature τ (multiplies the cosine).
    Returns:
        (w_h, w_hc), each [K, N, F] in the dtype of ``weights``, K = len(ks), in the order of ``ks``.
    """
    check_kt_inputs(prototypes, weights, counts, ks)
    p_hat = F.normalize(prototypes.float(), dim=1)
    w_hat = F.normalize(weights.float(), dim=1)
    scores = tau * p_hat @ w_hat.T  # [N, N]
    w_kt = []
    for k in ks:
        masked = scores.masked_fill(~(counts > k)[None, :], float("-inf"))
        w_kt.append(torch.softmax(masked, dim=1) @ w_hat)
    w_h, w_hc = compose(torch.stack(w_kt), p_hat, w_hat)
    return w_h.to(weights.dtype), w_hc.to(weights.dtype)


def kt_attention(prototypes: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                 ks: Sequence[int], tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KT attention for every k in ``ks``: Triton on CUDA, the reference otherwise (or when
    ``LTDIST_KERNELS=reference``). Same arguments and result as :func:`kt_attention_reference`;
    ``counts`` (per-class metadata) may be on any device."""
    counts = counts.to(weights.device)
    if use_triton("kt_attention", prototypes=prototypes, weights=weights):
        from ltdist.kernels.kt_attention_triton import kt_attention_triton

        return kt_attention_triton(prototypes, weights, counts, ks, tau)
    return kt_attention_reference(prototypes, weights, counts, ks, tau)
