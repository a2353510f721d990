"""Triton count-aware prototype EMA: one program per class present in the batch walks that class's samples
in batch order (t ← t + 1, m_t = min(m, 1 − 1/t), c ← m_t c + (1 − m_t) z: exactly the sequential rule of
:mod:`ltdist.kernels.prototype_ema`). Deterministic: every output row is owned by one program, no atomics."""

import torch
import triton
import triton.language as tl
from ltdist.kernels._triton_matmul import F32_PTR, I64_PTR, INTERPRET
from ltdist.kernels.prototype_ema import check_ema_inputs, class_segments


@triton.jit
def _ema_kernel(out_ptr: F32_PTR, feats_ptr, classes_ptr: I64_PTR, starts_ptr: I64_PTR, counts_ptr: I64_PTR,
                order_ptr: I64_PTR, seen_ptr: I64_PTR, F, m: tl.float32, BLOCK_F: tl.constexpr = 1024):
    # BLOCK_F's default is the largest block the wrapper launches (the one the compile check builds)
    cls = tl.load(classes_ptr + tl.program_id(0)).to(tl.int64)
    start = tl.load(starts_ptr + cls)
    n = tl.load(counts_ptr + cls)
    seen = tl.load(seen_ptr + cls).to(tl.float32)  # updates of this class before the batch
    cols = tl.arange(0, BLOCK_F)
    row = out_ptr + cls * F
    for f0 in range(0, F, BLOCK_F):
        mask = f0 + cols < F
        c = tl.load(row + f0 + cols, mask=mask, other=0.0)
        for r in range(0, n):
            sample = tl.load(order_ptr + start + r).to(tl.int64)
            z = tl.load(feats_ptr + sample * F + f0 + cols, mask=mask, other=0.0).to(tl.float32)
            mt = tl.minimum(1.0 - 1.0 / (seen + r + 1.0), m)
            c = mt * c + (1.0 - mt) * z
        tl.store(row + f0 + cols, c, mask=mask)


def prototype_ema_triton(protos: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                         m: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`ltdist.kernels.prototype_ema.prototype_ema_reference`."""
    check_ema_inputs(protos, counts, feats, labels, m)
    out = protos.float().contiguous().clone()
    if labels.numel() == 0:
        return out.to(protos.dtype), counts.clone()
    order, starts, num = class_segments(labels, protos.shape[0])
    classes = torch.nonzero(num).flatten()
    F_ = protos.shape[1]
    block = 16 if INTERPRET else min(1024, triton.next_power_of_2(F_))
    _ema_kernel[(classes.numel(),)](out, feats.contiguous(), classes, starts, num, order, counts.contiguous(), F_,
                                    float(m), BLOCK_F=block)
    return out.to(protos.dtype), counts + num
