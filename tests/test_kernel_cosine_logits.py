"""Triton cosine logits and fused cosine cross-entropy vs the PyTorch references (TRITON_INTERPRET on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from ltdist.kernels import cosine_logits_triton  # noqa: E402
from ltdist.kernels._dispatch import use_triton  # noqa: E402
from ltdist.kernels.cosine_logits import (  # noqa: E402
    cosine_cross_entropy_reference,
    cosine_logits_reference,
)

SHAPES = [(19, 23, 37), (5, 40, 17)]  # B, N, F: none a multiple of the 16/32/64 tiles
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _leaves(B: int, N: int, F: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, generator=g).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(N, F, generator=g).to(DEVICE, dtype).requires_grad_()
    s = torch.tensor(7.0, device=DEVICE).requires_grad_()
    return x, w, s


def _grads(loss: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return [g.float() for g in torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cosine_logits_forward_backward(shape, dtype):
    x, w, s = _leaves(*shape, dtype)
    upstream = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fast = cosine_logits_triton.CosineLogits.apply(x, w, s)
    ref = cosine_logits_reference(x, w, s)
    assert fast.dtype == dtype and fast.shape == (shape[0], shape[1])
    torch.testing.assert_close(fast.float(), ref.float(), **TOL[dtype])
    for a, b in zip(_grads((fast.float() * upstream).sum(), x, w, s), _grads((ref.float() * upstream).sum(), x, w, s)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_elements", [1 << 21, 64], ids=["one-chunk", "many-chunks"])
def test_fused_cross_entropy_loss_and_grads(dtype, chunk_elements, monkeypatch):
    monkeypatch.setattr(cosine_logits_triton, "CE_CHUNK_ELEMENTS", chunk_elements)
    B, N, F = SHAPES[0]
    x, w, s = _leaves(B, N, F, dtype, seed=2)
    labels = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    fast = cosine_logits_triton.CosineCrossEntropy.apply(x, w, s, labels)
    ref = cosine_cross_entropy_reference(x, w, s, labels)
    torch.testing.assert_close(fast, ref, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-4)
    # upstream gradient ≠ 1 checks the scaling of the precomputed gradients
    for a, b in zip(_grads(3 * fast, x, w, s), _grads(3 * ref, x, w, s)):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_references_pass_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(cosine_logits_reference, (x, w, s))
    assert torch.autograd.gradcheck(lambda *a: cosine_cross_entropy_reference(*a, labels), (x, w, s))


def test_dispatch_by_device_and_reference_override(monkeypatch):
    t = torch.zeros(2, 2)
    assert not use_triton("op", t=t)  # CPU tensors: reference
    if torch.cuda.is_available():
        assert use_triton("op", t=t.cuda())
    monkeypatch.setenv("LTDIST_KERNELS", "reference")
    assert not use_triton("op", t=t.to(DEVICE))
