"""Prototype EMA (paper 2, §3.2): c_k ← m c_k + (1−m) z_i for each sample in batch order, then
re-normalise the updated prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ltdist.kernels._dispatch import use_triton


def check_ema_inputs(protos: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, m: float) -> None:
    if protos.dim() != 2 or feats.dim() != 2 or protos.shape[1] != feats.shape[1]:
        raise ValueError(f"prototype_ema: need protos [C,F] and feats [B,F], got {tuple(protos.shape)} "
                         f"and {tuple(feats.shape)}")
    if labels.shape != (feats.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"prototype_ema: labels must be int64 [{feats.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"prototype_ema: momentum m must be in [0, 1], got {m}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= protos.shape[0]):
        raise ValueError(f"prototype_ema: labels must lie in [0, {protos.shape[0]}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def prototype_ema_reference(protos: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                            m: float) -> torch.Tensor:
    """Closed form by class segment: c_k ← m^{n_k} c_k + (1−m) Σ_r m^{n_k−r} z_r (r = 1..n_k in batch
    order), then L2-normalise the classes present in the batch; absent classes are returned as is.

    protos [C,F], feats [B,F], labels [B] int64 → new prototypes [C,F] (protos' dtype, fp32 math).
    """
    check_ema_inputs(protos, feats, labels, m)
    out = protos.float().clone()
    z = feats.float()
    num = torch.bincount(labels, minlength=protos.shape[0])
    # rank r of each sample inside its class (1-based, batch order) → weight m^{n_k − r}
    order = torch.sort(labels, stable=True).indices
    starts = torch.cumsum(num, 0) - num
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]] + 1
    weight = (1.0 - m) * torch.pow(torch.tensor(m, dtype=torch.float64), (num[labels] - rank).double())
    out *= torch.pow(torch.tensor(m, dtype=torch.float64), num.double()).float()[:, None]
    out.index_add_(0, labels, z * weight.float()[:, None])
    present = num > 0
    out[present] = F.normalize(out[present], dim=1)
    return out.to(protos.dtype)


def prototype_ema(protos: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, m: float) -> torch.Tensor:
    """Updated, re-normalised prototypes [C,F] (new tensor; ``protos`` is not modified).

    Triton on CUDA (one program per class walks its samples in batch order: deterministic, no
    atomics), the reference otherwise or when ``LTDIST_KERNELS=reference``.
    """
    if use_triton("prototype_ema", protos=protos, feats=feats, labels=labels):
        from ltdist.kernels.prototype_ema_triton import prototype_ema_triton

        return prototype_ema_triton(protos, feats, labels, m)
    return prototype_ema_reference(protos, feats, labels, m)
