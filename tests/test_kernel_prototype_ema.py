"""Count-aware prototype EMA (Triton and reference) equals the sequential Python loop over the batch:
a running mean for a class's first updates, eq. 1's EMA with m after."""

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


def python_loop(protos: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                m: float) -> tuple[torch.Tensor, torch.Tensor]:
    c, t = protos.double().clone(), counts.clone()
    for z, k in zip(feats.double(), labels.tolist()):
        t[k] += 1
        if t[k] <= 1 / (1 - m):  # running mean: c is the mean of the class's features so far
            c[k] = c[k] + (z - c[k]) / float(t[k])
        else:  # eq. 1
            c[k] = m * c[k] + (1 - m) * z
    return c, t


def _problem(C: int, B: int, F_: int, labels: torch.Tensor | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(C, F_, generator=g), dim=1)
    feats = F.normalize(torch.randn(B, F_, generator=g), dim=1)
    if labels is None:
        labels = torch.randint(0, C - 1, (B,), generator=g)  # class C-1 is always absent
    # class 0 never seen (its row is zero), the others part-way through the running-mean phase or past it
    counts = torch.tensor([0, 3, 5, 9, 400, 0, 2][:C] + [0] * max(0, C - 7), dtype=torch.int64)
    protos[counts == 0] = 0
    return protos, counts, feats, labels


CASES = {
    "mixed": (7, 29, 37, None),
    "all-equal": (4, 13, 21, torch.full((13,), 2)),
    "one-sample": (3, 1, 19, torch.tensor([0])),
}


@pytest.mark.parametrize("impl", [prototype_ema_reference, prototype_ema_triton], ids=["reference", "triton"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_ema_equals_python_loop(impl, case):
    C, B, F_, labels = CASES[case]
    protos, counts, feats, labels = _problem(C, B, F_, labels)
    m = 0.9  # running mean for a class's first 10 updates, eq. 1 from the 11th
    out, new_counts = impl(protos.to(DEVICE), counts.to(DEVICE), feats.to(DEVICE), labels.to(DEVICE), m)
    expected, expected_counts = python_loop(protos, counts, feats, labels, m)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(new_counts.cpu(), expected_counts)
    absent = torch.ones(C, dtype=torch.bool)
    absent[labels] = False
    assert torch.equal(out.cpu()[absent], protos[absent])  # untouched, bit for bit


def test_ema_is_the_running_mean_then_eq1():
    # one class, 30 samples from zero: the first 10 give their mean, the next 20 eq. 1 with m = 0.9
    protos, counts = torch.zeros(1, 5), torch.zeros(1, dtype=torch.int64)
    feats = F.normalize(torch.randn(30, 5, generator=torch.Generator().manual_seed(7)), dim=1)
    labels = torch.zeros(30, dtype=torch.int64)
    first, n = prototype_ema_reference(protos, counts, feats[:10], labels[:10], 0.9)
    torch.testing.assert_close(first[0], feats[:10].mean(0), atol=1e-6, rtol=1e-5)
    assert int(n) == 10
    last, n = prototype_ema_reference(first, n, feats[10:], labels[10:], 0.9)
    expected = first[0].double()
    for z in feats[10:].double():
        expected = 0.9 * expected + 0.1 * z
    torch.testing.assert_close(last[0].double(), expected, atol=1e-6, rtol=1e-5)
    # the split into batches does not matter: one batch of 30 gives the same
    whole, _ = prototype_ema_reference(protos, counts, feats, labels, 0.9)
    torch.testing.assert_close(whole, last, atol=1e-6, rtol=1e-5)


def test_ema_triton_is_deterministic_and_bf16_close():
    protos, counts, feats, labels = _problem(6, 40, 33, seed=4)
    args = (protos.to(DEVICE), counts.to(DEVICE), feats.to(DEVICE), labels.to(DEVICE), 0.99)
    assert torch.equal(prototype_ema_triton(*args)[0], prototype_ema_triton(*args)[0])
    bf16, _ = prototype_ema_triton(args[0].bfloat16(), args[1], args[2].bfloat16(), args[3], 0.99)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float().cpu(), prototype_ema_reference(*args)[0].cpu(), atol=1e-2, rtol=1e-2)


def test_ema_rejects_out_of_range_labels():
    protos, counts, feats, _ = _problem(3, 4, 5)
    with pytest.raises(ValueError, match="labels must lie in"):
        prototype_ema(protos, counts, feats, torch.tensor([0, 1, 3, 1]), 0.9)
    with pytest.raises(ValueError, match="counts must be int64"):
        prototype_ema(protos, counts.float(), feats, torch.tensor([0, 1, 2, 1]), 0.9)
