"""Prototype EMA (Triton and reference) equals the sequential Python loop over the batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from ltdist.kernels.prototype_ema import prototype_ema, prototype_ema_reference  # noqa: E402
from ltdist.kernels.prototype_ema_triton import prototype_ema_triton  # noqa: E402


def python_loop(protos: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, m: float) -> torch.Tensor:
    c = protos.double().clone()
    for z, k in zip(feats.double(), labels.tolist()):
        c[k] = m * c[k] + (1 - m) * z
    present = torch.unique(labels)
    c[present] = F.normalize(c[present], dim=1)
    return c


def _problem(C: int, B: int, F_: int, labels: torch.Tensor | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(C, F_, generator=g), dim=1)
    feats = F.normalize(torch.randn(B, F_, generator=g), dim=1)
    if labels is None:
        labels = torch.randint(0, C - 1, (B,), generator=g)  # class C-1 is always absent
    return protos, feats, labels


CASES = {
    "mixed": (7, 29, 37, None),
    "all-equal": (4, 13, 21, torch.full((13,), 2)),
    "one-sample": (3, 1, 19, torch.tensor([0])),
}


@pytest.mark.parametrize("impl", [prototype_ema_reference, prototype_ema_triton], ids=["reference", "triton"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_ema_equals_python_loop(impl, case):
    C, B, F_, labels = CASES[case]
    protos, feats, labels = _problem(C, B, F_, labels)
    m = 0.9
    out = impl(protos.to(DEVICE), feats.to(DEVICE), labels.to(DEVICE), m).cpu()
    expected = python_loop(protos, feats, labels, m)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)
    absent = torch.ones(C, dtype=torch.bool)
    absent[labels] = False
    assert torch.equal(out[absent], protos[absent])  # untouched, bit for bit


def test_ema_triton_is_deterministic_and_bf16_close():
    protos, feats, labels = _problem(6, 40, 33, seed=4)
    args = (protos.to(DEVICE), feats.to(DEVICE), labels.to(DEVICE), 0.99)
    assert torch.equal(prototype_ema_triton(*args), prototype_ema_triton(*args))
    bf16 = prototype_ema_triton(args[0].bfloat16(), args[1].bfloat16(), args[2], 0.99)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float().cpu(), prototype_ema_reference(*args).cpu(), atol=1e-2, rtol=1e-2)


def test_ema_rejects_out_of_range_labels():
    protos, feats, _ = _problem(3, 4, 5)
    with pytest.raises(ValueError, match="labels must lie in"):
        prototype_ema(protos, feats, torch.tensor([0, 1, 3, 1]), 0.9)
