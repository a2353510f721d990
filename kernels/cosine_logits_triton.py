"""Triton autograd ops behind :mod:`ltdist.kernels.cosine_logits`.

logits L = s · x̂ ŵᵀ. With upstream gradient G [B,N], r_b = Σ_n G_bn L_bn and q_n = Σ_b G_bn L_bn:
    dx_b = (s Σ_n G_bn w_n/‖w_n‖ − r_b x_b/‖x_b‖) / ‖x_b‖
    dw_n = (s Σ_b G_bn x_b/‖x_b‖ − q_n w_n/‖w_n‖) / ‖w_n‖
    ds   = Σ_bn G_bn L_bn / s
each a single :func:`scaled_gmm` launch (normalisations folded into its row/column factors).
"""

import torch
import triton
import triton.language as tl
from ltdist.kernels._triton_matmul import F32_PTR, I64_PTR, INTERPRET, cosine_matmul, scaled_gmm

# rows of x per chunk of the fused cross-entropy: the chunk's logits are the only B×N-shaped buffer
CE_CHUNK_ELEMENTS = 1 << 21


def _input_grads(g: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                 rx: torch.Tensor, rw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gl = g * logits
    r, q = gl.sum(1), gl.sum(0)
    s = scale.float()
    dx = scaled_gmm(g, w, rx, s * rw, x=x, b=rx * rx * r)
    dw = scaled_gmm(g.T, x, rw, s * rx, x=w, b=rw * rw * q)
    return dx, dw, r.sum() / s


class CosineLogits(torch.autograd.Function):
    """scale · cos(x, w) [B,N] with Triton forward and backward; x [B,F], w [N,F], scale 0-d."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        logits, rx, rw = cosine_matmul(x, w, scale)
        ctx.save_for_backward(x, w, scale, logits, rx, rw)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, scale, logits, rx, rw = ctx.saved_tensors
        dx, dw, ds = _input_grads(grad.float().contiguous(), logits.float(), x, w, scale, rx, rw)
        return dx, dw, ds.to(scale.dtype).reshape(scale.shape)


@triton.jit
def _ce_grad_kernel(logits_ptr: F32_PTR, grad_ptr: F32_PTR, labels_ptr: I64_PTR, loss_ptr: F32_PTR, N,
                    inv_batch: tl.float32, BLOCK: tl.constexpr = 4096):
    """One row: loss = logsumexp(L) − L_y; grad = (softmax(L) − onehot(y)) / B (fp32). BLOCK's default is the
    largest block the wrapper launches."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    y = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK)
    m_run = tl.full((BLOCK,), float("-inf"), tl.float32)
    s_run = tl.zeros((BLOCK,), tl.float32)
    for n0 in range(0, N, BLOCK):
        v = tl.load(logits_ptr + base + n0 + cols, mask=n0 + cols < N, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_run, v)
        s_run = s_run * tl.exp(tl.where(m_new == float("-inf"), 0.0, m_run - m_new)) + tl.where(
            v == float("-inf"), 0.0, tl.exp(v - m_new))
        m_run = m_new
    m = tl.max(m_run, axis=0)
    lse = m + tl.log(tl.sum(s_run * tl.exp(tl.where(m_run == float("-inf"), float("-inf"), m_run - m)), axis=0))
    for n0 in range(0, N, BLOCK):
        idx = n0 + cols
        v = tl.load(logits_ptr + base + idx, mask=idx < N, other=0.0).to(tl.float32)
        g = (tl.exp(v - lse) - tl.where(idx == y, 1.0, 0.0)) * inv_batch
        tl.store(grad_ptr + base + idx, g, mask=idx < N)
    tl.store(loss_ptr + row, lse - tl.load(logits_ptr + base + y).to(tl.float32))


class CosineCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of scale · cos(x, w) against labels, gradients computed in the forward pass
    on chunks of rows (Liger-style fused linear cross-entropy): no full B×N logits buffer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, w, labels = x.contiguous(), w.contiguous(), labels.contiguous()  # the kernels index rows densely
        B, N = x.shape[0], w.shape[0]
        chunk = max(1, min(B, CE_CHUNK_ELEMENTS // N))
        s = scale.float()
        dx = torch.empty_like(x)
        dw_acc = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
        q = torch.zeros(N, device=w.device, dtype=torch.float32)
        loss = torch.empty(B, device=x.device, dtype=torch.float32)
        r_total = torch.zeros((), device=x.device, dtype=torch.float32)
        rw = None
        block = 16 if INTERPRET else min(4096, triton.next_power_of_2(N))
        for b0 in range(0, B, chunk):
            xc, yc = x[b0:b0 + chunk], labels[b0:b0 + chunk]
            logits, rx, rw = cosine_matmul(xc, w, scale, out_dtype=torch.float32)
            g = torch.empty_like(logits)
            _ce_grad_kernel[(xc.shape[0],)](logits, g, yc, loss[b0:b0 + chunk], N, 1.0 / B, BLOCK=block)
            gl = g * logits
            r = gl.sum(1)
            q += gl.sum(0)
            r_total += r.sum()
            scaled_gmm(g, w, rx, s * rw, x=xc, b=rx * rx * r, out=dx[b0:b0 + chunk])
            scaled_gmm(g.T, xc, torch.ones_like(rw), s * rx, out=dw_acc, accumulate=True)
        dw = (dw_acc * rw[:, None] - (rw * rw * q)[:, None] * w.float()).to(w.dtype)
        ctx.save_for_backward(dx, dw, (r_total / s).reshape(scale.shape))
        return loss.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx, dw, ds = ctx.saved_tensors
        return dx * grad.to(dx.dtype), dw * grad.to(dw.dtype), (ds * grad).to(ds.dtype), None
