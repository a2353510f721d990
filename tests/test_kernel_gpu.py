"""On a GPU (``pytest -m gpu``, run by ``make gpu-check``): every Triton op against its PyTorch reference at
several shapes and dtypes, forward and backward. The autotune caches are emptied first, so every test's
first call tunes on its real buffers, as a new shape does in training."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
triton = pytest.importorskip("triton")

from ltdist.kernels import _triton_matmul as tm  # noqa: E402
from ltdist.kernels._dispatch import use_triton  # noqa: E402
from ltdist.kernels.cosine_logits import (  # noqa: E402
    cosine_cross_entropy,
    cosine_cross_entropy_reference,
    cosine_logits,
    cosine_logits_reference,
)
from ltdist.kernels.kt_attention import kt_attention, kt_attention_reference  # noqa: E402
from ltdist.kernels.prototype_ema import prototype_ema, prototype_ema_reference  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
# relative Frobenius error: fp32 runs IEEE dots (no TF32); bf16 rounds the inputs of every dot
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# ds sums B·N terms of both signs: the summation order alone moves it by more than a matrix's relative error
SCALAR_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
SHAPES = [(64, 1000, 512), (256, 8142, 2048), (33, 77, 200)]  # B, N, F; the last one fits no tile


@pytest.fixture(autouse=True)
def fresh_autotune():
    for kernel in (tm._cosine_matmul_kernel, tm._scaled_gmm_kernel):
        kernel.cache.clear()


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _leaves(B: int, N: int, F_: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, F_, device="cuda", generator=g).to(dtype).requires_grad_()
    w = torch.randn(N, F_, device="cuda", generator=g).to(dtype).requires_grad_()
    return x, w, torch.tensor(16.0, device="cuda", requires_grad=True)


def test_this_gpu_takes_the_triton_path():
    assert use_triton("test", x=torch.zeros(1, device="cuda")) == (torch.cuda.get_device_capability() >= (8, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cosine_logits_forward_backward(shape, dtype):
    x, w, s = _leaves(*shape, dtype)
    up = torch.randn(shape[0], shape[1], device="cuda")
    fast, ref = cosine_logits(x, w, s), cosine_logits_reference(x, w, s)
    assert fast.dtype == dtype
    assert_rel_close(fast, ref, REL_TOL[dtype], "logits")
    got = torch.autograd.grad((fast.float() * up).sum(), (x, w, s))
    want = torch.autograd.grad((ref.float() * up).sum(), (x, w, s))
    for name, a, b in zip(("dx", "dw", "ds"), got, want):
        assert_rel_close(a, b, (SCALAR_TOL if name == "ds" else REL_TOL)[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cosine_cross_entropy_forward_backward(shape, dtype):
    x, w, s = _leaves(*shape, dtype, seed=1)
    labels = torch.randint(0, shape[1], (shape[0],), device="cuda")
    fast, ref = cosine_cross_entropy(x, w, s, labels), cosine_cross_entropy_reference(x, w, s, labels)
    assert_rel_close(fast, ref, REL_TOL[dtype], "loss")
    got, want = torch.autograd.grad(fast, (x, w, s)), torch.autograd.grad(ref, (x, w, s))
    for name, a, b in zip(("dx", "dw", "ds"), got, want):
        assert_rel_close(a, b, (SCALAR_TOL if name == "ds" else REL_TOL)[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(("N", "F_"), [(1000, 512), (8142, 2048), (301, 77)])
def test_kt_attention(N, F_, dtype):
    g = torch.Generator(device="cuda").manual_seed(2)
    P = torch.randn(N, F_, device="cuda", generator=g).to(dtype)
    W = torch.randn(N, F_, device="cuda", generator=g).to(dtype)
    counts = torch.randint(1, 1000, (N,), device="cuda", generator=g)
    for name, a, b in zip(("w_h", "w_hc"), kt_attention(P, W, counts, [0, 20, 100], 10.0),
                          kt_attention_reference(P, W, counts, [0, 20, 100], 10.0)):
        assert_rel_close(a, b, REL_TOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "C", "F_"), [(512, 1000, 2048), (4096, 8142, 2048), (37, 5, 3000)])
def test_prototype_ema(B, C, F_, dtype):
    g = torch.Generator(device="cuda").manual_seed(3)
    protos = F.normalize(torch.randn(C, F_, device="cuda", generator=g), dim=1)
    feats = torch.randn(B, F_, device="cuda", generator=g).to(dtype)
    labels = torch.randint(0, C, (B,), device="cuda", generator=g)
    seen = torch.randint(0, 200, (C,), device="cuda", generator=g)  # running-mean phase and eq. 1 (m = 0.99)
    fast, fast_seen = prototype_ema(protos, seen, feats, labels, 0.99)
    ref, ref_seen = prototype_ema_reference(protos, seen, feats, labels, 0.99)
    assert_rel_close(fast, ref, REL_TOL[dtype], "prototypes")
    assert torch.equal(fast_seen, ref_seen)
