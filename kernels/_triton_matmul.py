"""Two Triton matmul kernels shared by the cosine-logits and KT-attention ops.

``cosine_matmul``: out[m,n] = scale · (x_m·y_n) / (‖x_m‖‖y_n‖), the norms accumulated from the same
tiles as the dot product (no normalised copy of either operand), plus the inverse norms.

``scaled_gmm``: out[m,k] = a_m · Σ_n g(G[m,n]) · c_n · Y[n,k] − b_m · X[m,k], g(v) = v or exp(v − shift_m);
G may be a strided (e.g. transposed) view. This is the backward of the cosine logits (dx and dw) and
the α·Ŵ product of KT attention, with the normalisations folded into a, b and c.

Both accumulate in fp32; fp32 inputs use IEEE fp32 dot products (no TF32), bf16 inputs bf16 ones.
"""

# No ``from __future__ import annotations`` in the kernel modules: Triton reads the kernels' parameter
# annotations (F32_PTR, tl.float32) as types, and they fix the compiled signature.
import torch
import triton
import triton.language as tl
from ltdist.kernels._autotune import INTERPRET, autotune

# Kernels may only read globals that are constexpr (the interpreter accepts any; the compiler does not).
EPS = tl.constexpr(1e-12)  # as F.normalize: 1/max(‖v‖, EPS)
# Triton 3.9's interpreter computes bf16 tl.dot wrongly (garbage magnitudes), so under TRITON_INTERPRET
# the bf16 tiles are upcast to fp32 before the dot; on a GPU the dot runs in bf16 with fp32 accumulation.
UPCAST = tl.constexpr(INTERPRET)
F32_PTR = tl.pointer_type(tl.float32)  # annotation of the fp32 buffers (norms, row/column factors)
I64_PTR = tl.pointer_type(tl.int64)  # annotation of the index buffers (labels, classes, offsets)

_COSINE_FP32_TILES = [(64, 64, 16, 4, 2), (64, 32, 32, 4, 2), (32, 64, 32, 4, 2)]
# chosen with the compile check: none spills on sm_80 or sm_90 (128×128×64 and 128×64 on 4 warps did)
_COSINE_TC_TILES = [(128, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3)]


@autotune(key=["M", "N", "K"], dtype_arg="x_ptr", fp32_tiles=_COSINE_FP32_TILES, tc_tiles=_COSINE_TC_TILES)
@triton.jit
def _cosine_matmul_kernel(x_ptr, y_ptr, out_ptr, rx_ptr: F32_PTR, ry_ptr: F32_PTR, scale_ptr, M, N, K,
                          sxm, sxk, sym, syk, som, son,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # fp32 inputs: IEEE fp32 dot (no TF32); bf16: tensor-core dot with fp32 accumulation
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ssx = tl.zeros((BM,), dtype=tl.float32)
    ssy = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        yt = tl.load(y_ptr + rn[None, :] * sym + kk[:, None] * syk, mask=(rn[None, :] < N) & (kk[:, None] < K),
                     other=0.0)
        if IEEE or UPCAST:
            acc = tl.dot(x.to(tl.float32), yt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, yt, acc)
        xf = x.to(tl.float32)
        yf = yt.to(tl.float32)
        ssx += tl.sum(xf * xf, axis=1)
        ssy += tl.sum(yf * yf, axis=0)
    rx = 1.0 / tl.maximum(tl.sqrt(ssx), EPS)
    ry = 1.0 / tl.maximum(tl.sqrt(ssy), EPS)
    scale = tl.load(scale_ptr).to(tl.float32)
    out = acc * (scale * rx)[:, None] * ry[None, :]
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, out.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
    if pid_n == 0:
        tl.store(rx_ptr + rm, rx, mask=rm < M)
    if pid_m == 0:
        tl.store(ry_ptr + rn, ry, mask=rn < N)


def cosine_matmul(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M,K], y [N,K], scale 0-d → (scale·cos [M,N], 1/‖x‖ [M] fp32, 1/‖y‖ [N] fp32).

    ``out`` may be a (strided) [M,N] buffer to write into."""
    M, K = x.shape
    N = y.shape[0]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=out_dtype or x.dtype)
    rx = torch.empty(M, device=x.device, dtype=torch.float32)
    ry = torch.empty(N, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))
    _cosine_matmul_kernel[grid](x, y, out, rx, ry, scale, M, N, K, x.stride(0), x.stride(1), y.stride(0),
                                y.stride(1), out.stride(0), out.stride(1))
    return out, rx, ry


_GMM_FP32_TILES = [(64, 32, 64, 4, 2), (32, 32, 64, 4, 2), (64, 16, 64, 4, 2)]
# the fp32 G tile (BM×BN) is scaled in registers before the dot: 8 warps for the large tiles keep it from
# spilling; 128×128×32 needed 169 KiB of shared memory (more than an A100 has) and spilled 350 bytes
_GMM_TC_TILES = [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3), (128, 32, 64, 8, 4),
                 (64, 64, 32, 4, 4)]


# restore_value: with ACCUMULATE the kernel reads out, and every autotuning trial would add into it
@autotune(key=["M", "N", "K", "EXP", "HAS_X", "ACCUMULATE"], dtype_arg="y_ptr", fp32_tiles=_GMM_FP32_TILES,
          tc_tiles=_GMM_TC_TILES, restore_value=["out_ptr"])
@triton.jit
def _scaled_gmm_kernel(g_ptr: F32_PTR, y_ptr, x_ptr, out_ptr, a_ptr: F32_PTR, b_ptr: F32_PTR, c_ptr: F32_PTR,
                       shift_ptr: F32_PTR, M, N, K, sgm, sgn, syn, syk, sxm, sxk, som, sok,
                       EXP: tl.constexpr, HAS_X: tl.constexpr, ACCUMULATE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    IEEE: tl.constexpr = y_ptr.dtype.element_ty == tl.float32
    # tiles: BM rows of out, BK columns of out, BN = reduction step over n
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rn = tl.arange(0, BN)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    if EXP:
        shift = tl.load(shift_ptr + rm, mask=rm < M, other=0.0)
    for n0 in range(0, N, BN):
        nn = n0 + rn
        g = tl.load(g_ptr + rm[:, None] * sgm + nn[None, :] * sgn, mask=(rm[:, None] < M) & (nn[None, :] < N),
                    other=0.0).to(tl.float32)
        if EXP:
            g = tl.where(nn[None, :] < N, tl.exp(g - shift[:, None]), 0.0)
        c = tl.load(c_ptr + nn, mask=nn < N, other=0.0)
        g = g * c[None, :]
        y = tl.load(y_ptr + nn[:, None] * syn + rk[None, :] * syk, mask=(nn[:, None] < N) & (rk[None, :] < K),
                    other=0.0)
        if IEEE or UPCAST:
            acc = tl.dot(g, y.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(g.to(y.dtype), y, acc)
    a = tl.load(a_ptr + rm, mask=rm < M, other=0.0)
    out = acc * a[:, None]
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    if HAS_X:
        b = tl.load(b_ptr + rm, mask=rm < M, other=0.0)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
        out -= b[:, None] * x
    o_ptrs = out_ptr + rm[:, None] * som + rk[None, :] * sok
    if ACCUMULATE:
        out += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def scaled_gmm(g: torch.Tensor, y: torch.Tensor, a: torch.Tensor, c: torch.Tensor, *,
               x: torch.Tensor | None = None, b: torch.Tensor | None = None, shift: torch.Tensor | None = None,
               out: torch.Tensor | None = None, accumulate: bool = False,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out [M,K] (+)= a[:,None] · (g'(G) · c[None,:]) @ Y − b[:,None] · X.

    G [M,N] fp32 (any strides), Y [N,K], a [M], c [N], b [M] fp32; X [M,K] optional;
    ``shift`` [M] turns g' into exp(G − shift[:,None]); ``accumulate`` adds to ``out``.
    """
    M, N = g.shape
    K = y.shape[1]
    # the kernel's signature fixes these to fp32 (the compiled code would misread other dtypes)
    assert all(t is None or t.dtype == torch.float32 for t in (g, a, c, b, shift)), "scaled_gmm: fp32 factors"
    if out is None:
        out = torch.empty(M, K, device=y.device, dtype=out_dtype or y.dtype)
    has_x = x is not None
    xx = x if has_x else y  # placeholder pointer, never read when HAS_X is false
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(K, meta["BK"]))
    _scaled_gmm_kernel[grid](g, y, xx, out, a, b if has_x else a, c, shift if shift is not None else a, M, N, K,
                             g.stride(0), g.stride(1), y.stride(0), y.stride(1), xx.stride(0), xx.stride(1),
                             out.stride(0), out.stride(1), EXP=shift is not None, HAS_X=has_x, ACCUMULATE=accumulate)
    return out
