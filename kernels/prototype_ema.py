"""Count-aware prototype EMA (paper 2, §3.2, eq. 1): per sample i of class k, in batch order,

    t_k ← t_k + 1,   m_t = min(m, 1 − 1/t_k),   c_k ← m_t c_k + (1 − m_t) z_i.

For the first ≈ 1/(1−m) updates of a class m_t = (t−1)/t, so c_k is exactly the running mean of the
features it was updated with; afterwards m_t = m and this is eq. 1's EMA unchanged. Why not eq. 1 from
the first sample: with m = 0.999 a prototype moves by 0.1 % per sample, so a class seen a few dozen
times (a 6-image Fashion-MNIST-LT class over 5 epochs, a 2-image iNaturalist class over 200) keeps
≈ 97 % of whatever its first sample was. The running mean removes that start-up bias and leaves the
steady state alone. The prototypes are kept un-normalised (a weighted mean of the features); users
normalise them when they score with them, so the running mean is exact.
"""

from __future__ import annotations

import torch
from ltdist.kernels._dispatch import use_triton

from ltdist.labels import check_label_range


def check_ema_inputs(protos: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                     m: float) -> None:
    if protos.dim() != 2 or feats.dim() != 2 or protos.shape[1] != feats.shape[1]:
        raise ValueError(f"prototype_ema: need protos [C,F] and feats [B,F], got {tuple(protos.shape)} "
                         f"and {tuple(feats.shape)}")
    if counts.shape != (protos.shape[0],) or counts.dtype != torch.int64:
        raise ValueError(f"prototype_ema: counts must be int64 [{protos.shape[0]}], got {counts.dtype} "
                         f"{tuple(counts.shape)}")
    if labels.shape != (feats.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"prototype_ema: labels must be int64 [{feats.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"prototype_ema: momentum m must be in [0, 1], got {m}")
    check_label_range(labels, protos.shape[0], "prototype_ema: labels")


def class_segments(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, starts, num): ``order`` [B] sorts the batch by class keeping batch order inside a class;
    class k's samples are ``order[starts[k] : starts[k] + num[k]]``."""
    order = torch.sort(labels, stable=True).indices
    num = torch.bincount(labels, minlength=num_classes)
    return order, torch.cumsum(num, 0) - num, num


def prototype_ema_reference(protos: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor,
                            labels: torch.Tensor, m: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential rule, vectorised over classes: step r updates every class with its r-th sample of
    the batch (at most one sample per class per step, so the steps are the sequential order).

    protos [C,F], counts [C] int64 (updates seen so far), feats [B,F], labels [B] int64 →
    (prototypes [C,F] in protos' dtype, fp32 math; counts + per-class batch counts). Classes absent
    from the batch are returned bit for bit.
    """
    check_ema_inputs(protos, counts, feats, labels, m)
    out = protos.float().clone()
    z = feats.float()
    order, starts, num = class_segments(labels, protos.shape[0])
    rank = torch.empty_like(labels)  # 0-based position of each sample inside its class
    rank[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    for r in range(int(num.max()) if labels.numel() else 0):
        samples = (rank == r).nonzero().flatten()
        k = labels[samples]
        t = (counts[k] + r + 1).float()
        mt = torch.clamp(1.0 - 1.0 / t, max=m)[:, None]  # fp32, as the kernel computes it
        out[k] = mt * out[k] + (1.0 - mt) * z[samples]
    return out.to(protos.dtype), counts + num


def prototype_ema(protos: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                  m: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Updated prototypes [C,F] and counts [C] (new tensors; the inputs are not modified).

    Triton on CUDA (one program per class walks its samples in batch order: deterministic, no
    atomics), the reference otherwise or when ``LTDIST_KERNELS=reference``.
    """
    if use_triton("prototype_ema", protos=protos, counts=counts, feats=feats, labels=labels):
        from ltdist.kernels.prototype_ema_triton import prototype_ema_triton

        return prototype_ema_triton(protos, counts, feats, labels, m)
    return prototype_ema_reference(protos, counts, feats, labels, m)
