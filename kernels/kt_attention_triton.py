"""Triton KT attention: all thresholds k from one pass over the scores.

Classes are sorted by count (descending), so {j : n_j > k} is the column prefix [0, m_k). The distinct
m_k cut the columns into segments; for a chunk of rows, one :func:`cosine_matmul` gives the scores
S = τ p̂ ŵᵀ of the largest prefix, and one :func:`scaled_gmm` per segment gives U_g = exp(S_g − max_g) Ŵ_g
(segments are disjoint, so together they cost one matmul). w_kt(k) merges the segments of its prefix
with the usual log-sum-exp rescaling. Only a [rows, m] score block exists at a time, never N×N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from ltdist.kernels._triton_matmul import cosine_matmul, scaled_gmm
from ltdist.kernels.kt_attention import check_kt_inputs, compose

ROW_CHUNK_ELEMENTS = 1 << 24  # score-block budget (rows × attended classes), 64 MB in fp32


def kt_attention_triton(prototypes: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                        ks: Sequence[int], tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`ltdist.kernels.kt_attention.kt_attention_reference`."""
    check_kt_inputs(prototypes, weights, counts, ks)
    N, F_ = weights.shape
    order = torch.sort(counts, descending=True, stable=True).indices
    w_sorted = weights[order].contiguous()
    prefix = [int((counts > k).sum()) for k in ks]  # m_k: attended classes are w_sorted[:m_k]
    bounds = sorted(set(prefix))
    segments = list(zip([0, *bounds[:-1]], bounds))
    width = bounds[-1]
    tau_t = torch.tensor(float(tau), device=weights.device, dtype=torch.float32)
    rows = max(1, min(N, ROW_CHUNK_ELEMENTS // width))
    w_kt = torch.empty(len(ks), N, F_, device=weights.device, dtype=torch.float32)
    protos = prototypes.contiguous()
    for r0 in range(0, N, rows):
        p = protos[r0:r0 + rows]
        scores, _, rw = cosine_matmul(p, w_sorted[:width], tau_t, out_dtype=torch.float32)
        ones = torch.ones(p.shape[0], device=p.device, dtype=torch.float32)
        # per segment: running max, Σ exp(S − max), Σ exp(S − max) ŵ
        seg_max, seg_sum, seg_vec = [], [], []
        for lo, hi in segments:
            s = scores[:, lo:hi]
            mx = s.amax(dim=1)
            seg_max.append(mx)
            seg_sum.append(torch.exp(s - mx[:, None]).sum(1))
            seg_vec.append(scaled_gmm(s, w_sorted[lo:hi], ones, rw[lo:hi], shift=mx, out_dtype=torch.float32))
        # merge segment prefixes: cumulative log-sum-exp rescaling
        merged = {}
        m_run = seg_max[0]
        z_run, u_run = seg_sum[0], seg_vec[0]
        merged[segments[0][1]] = u_run / z_run[:, None]
        for g in range(1, len(segments)):
            m_new = torch.maximum(m_run, seg_max[g])
            a, b = torch.exp(m_run - m_new), torch.exp(seg_max[g] - m_new)
            z_run = z_run * a + seg_sum[g] * b
            u_run = u_run * a[:, None] + seg_vec[g] * b[:, None]
            m_run = m_new
            merged[segments[g][1]] = u_run / z_run[:, None]
        for i, m in enumerate(prefix):
            w_kt[i, r0:r0 + rows] = merged[m]
    p_hat = F.normalize(prototypes.float(), dim=1)
    w_hat = F.normalize(weights.float(), dim=1)
    w_h, w_hc = compose(w_kt, p_hat, w_hat)
    return w_h.to(weights.dtype), w_hc.to(weights.dtype)
