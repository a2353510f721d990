"""KT attention: Triton (segmented, one pass for all k) vs the dense reference, and the reference vs the
paper's equations written out per class."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from ltdist.kernels import kt_attention_triton as ktt  # noqa: E402
from ltdist.kernels.kt_attention import kt_attention, kt_attention_reference  # noqa: E402


def _problem(N: int, F_: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 60, (N,), generator=g)
    counts[3] = counts[5]  # ties in the sort order
    return torch.randn(N, F_, generator=g), torch.randn(N, F_, generator=g), counts


def test_reference_follows_the_paper_equations():
    P, W, counts = _problem(9, 5)
    tau, k = 10.0, 20
    w_h, w_hc = kt_attention_reference(P, W, counts, [k], tau)
    for i in range(9):
        p_hat = P[i] / P[i].norm()
        pool = [j for j in range(9) if counts[j] > k]
        w_hats = [W[j] / W[j].norm() for j in pool]
        logits = torch.stack([tau * p_hat @ wj for wj in w_hats])
        alpha = torch.softmax(logits, 0)
        w_kt = sum(a * wj for a, wj in zip(alpha, w_hats))  # eq. 4
        expected_hc = w_kt / w_kt.norm() + p_hat  # eq. 9
        torch.testing.assert_close(w_hc[0, i], expected_hc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w_h[0, i], expected_hc + W[i] / W[i].norm(), atol=1e-5, rtol=1e-5)  # eq. 7


@pytest.mark.parametrize("row_chunk", [1 << 24, 40], ids=["one-chunk", "row-chunks"])
def test_triton_equals_dense_for_several_k(row_chunk, monkeypatch):
    monkeypatch.setattr(ktt, "ROW_CHUNK_ELEMENTS", row_chunk)
    P, W, counts = _problem(27, 21)
    ks = [0, 20, 5, 20, 45]  # unsorted, repeated, k = 0
    fast = ktt.kt_attention_triton(P.to(DEVICE), W.to(DEVICE), counts.to(DEVICE), ks, 10.0)
    ref = kt_attention_reference(P, W, counts, ks, 10.0)
    for a, b in zip(fast, ref):
        assert a.shape == (len(ks), 27, 21)
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)


def test_triton_bf16_is_close():
    P, W, counts = _problem(19, 33, seed=1)
    fast = ktt.kt_attention_triton(P.to(DEVICE).bfloat16(), W.to(DEVICE).bfloat16(), counts.to(DEVICE), [0, 10], 10.0)
    ref = kt_attention_reference(P.bfloat16(), W.bfloat16(), counts, [0, 10], 10.0)
    for a, b in zip(fast, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(F.normalize(a.float().cpu(), dim=-1), F.normalize(b.float(), dim=-1),
                                   atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("impl", [kt_attention, ktt.kt_attention_triton], ids=["dispatch", "triton"])
def test_k_above_every_count_is_a_clear_error(impl):
    P, W, counts = _problem(8, 4)
    top = int(counts.max())
    with pytest.raises(ValueError, match=rf"k={top}.*max count is {top}"):
        impl(P, W, counts, [0, top], 10.0)
