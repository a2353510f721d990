"""Calibrated Gaussian sampler: C++ factor path vs the dense Cholesky reference and vs Σ itself."""

from __future__ import annotations

import pytest
import torch
from ltdist.kernels.calibrated_sampler import (
    calibrated_moments,
    calibrated_sample,
    calibrated_sample_dense,
    group_bank,
)

from ltdist.extension import extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="ltdist._C is not built")

ALPHA, BETA = 0.4, 0.05


def make_problem(counts: list[int], d: int, seed: int = 0):
    """A bank with anisotropic classes (per-dimension scales 2 … 0.05), centres = class means + noise."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.3, -1.3, d)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    feats = torch.randn(labels.numel(), d, generator=g) * scales + torch.randn(len(counts), d, generator=g)[labels]
    bank, offsets = group_bank(feats, labels, len(counts))
    centres = torch.stack([bank[offsets[c]:offsets[c + 1]].mean(0) for c in range(len(counts))])
    centres += 0.1 * torch.randn(centres.shape, generator=g)
    return bank, offsets, centres


def request(bank, offsets, centres, own: int, nbrs: list[int], weights: list[float], copies: int = 1):
    src = bank[offsets[own]].expand(copies, -1).contiguous()
    return (bank, offsets, centres, src, torch.full((copies,), own), torch.tensor([nbrs] * copies),
            torch.tensor([weights] * copies))


def test_seeded_determinism_and_thread_independence():
    # d = 600: the CPU GEMMs span three column blocks, so two threads really split them
    args = request(*make_problem([5, 30, 40, 1], d=600), own=0, nbrs=[1, 2, 3], weights=[0.5, 0.3, 0.2], copies=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = calibrated_sample(*args, ALPHA, BETA, samples_per_source=7, seed=123)
        torch.set_num_threads(1)
        b = calibrated_sample(*args, ALPHA, BETA, samples_per_source=7, seed=123)
    finally:
        torch.set_num_threads(threads)
    c = calibrated_sample(*args, ALPHA, BETA, samples_per_source=7, seed=124)
    assert a.shape == (6, 7, 600)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0, 0], a[0, 1])  # draws differ from each other


def mixed_requests(d: int = 24):
    """Sources of several classes with overlapping neighbours: the classes' GEMMs take rows of many sources."""
    bank, offsets, centres = make_problem([5, 30, 40, 1, 12, 2], d=d, seed=4)
    own = torch.tensor([0, 4, 0, 5, 3, 4, 0, 5])
    nbrs = torch.tensor([[1, 2, 4], [1, 2, 3], [2, 1, 3], [2, 1, 4], [1, 4, 2], [2, 2, 1], [1, 1, 2], [4, 3, 1]])
    weights = torch.softmax(torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    weights[6, 2] = 0.0  # an unused slot
    return bank, offsets, centres, bank[offsets[own] + 0], own, nbrs, weights


def test_one_call_for_all_draws_matches_one_draw_at_a_time():
    args = mixed_requests()
    streams = torch.tensor([11, 3, 40, 7, 0, 5, 9, 2])
    batched = calibrated_sample(*args, ALPHA, BETA, samples_per_source=1, seed=9, streams=streams,
                                beta_shared=0.01)[:, 0]
    for s in range(8):  # the reference: one call, one source, one draw
        one = calibrated_sample(*(t[s:s + 1] if i >= 3 else t for i, t in enumerate(args)), ALPHA, BETA,
                                samples_per_source=1, seed=9, streams=streams[s:s + 1], beta_shared=0.01)[0, 0]
        # the same normals; only the GEMM's rounding may differ with the number of rows it multiplies
        torch.testing.assert_close(batched[s], one, atol=1e-6, rtol=1e-5)
    # draw r of a request is stream (seed, stream, r): the first of 6 draws is the single draw above
    six = calibrated_sample(*args, ALPHA, BETA, samples_per_source=6, seed=9, streams=streams, beta_shared=0.01)
    torch.testing.assert_close(six[:, 0], batched, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(six[:, 1], batched)
    assert torch.equal(six, calibrated_sample(*args, ALPHA, BETA, samples_per_source=6, seed=9, streams=streams,
                                              beta_shared=0.01))  # reruns are identical


def test_precisions_on_the_cpu():
    args = mixed_requests()
    fp32 = calibrated_sample(*args, ALPHA, BETA, samples_per_source=3, seed=0)
    bf16 = calibrated_sample(*args, ALPHA, BETA, samples_per_source=3, seed=0, precision="bf16")
    assert not torch.equal(bf16, fp32)  # the GEMM inputs are rounded to bf16 ...
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.02)  # ... and accumulated in fp32
    with pytest.raises(ValueError, match="tf32"):
        calibrated_sample(*args, ALPHA, BETA, samples_per_source=3, seed=0, precision="tf32")
    with pytest.raises(ValueError, match="precision"):
        calibrated_sample(*args, ALPHA, BETA, samples_per_source=3, seed=0, precision="fp16")


def test_group_bank_in_place_reorders_the_features_themselves():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (300,), generator=g)
    feats = torch.randn(300, 7, generator=g)
    copy, offsets = group_bank(feats, labels, 5)
    same, offsets_in_place = group_bank(feats, labels, 5, in_place=True)
    assert same.data_ptr() == feats.data_ptr()
    assert torch.equal(same, copy) and torch.equal(offsets_in_place, offsets)
    with pytest.raises(RuntimeError, match="not a permutation"):
        torch.ops.ltdist.permute_rows_(torch.zeros(3, 2), torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mean_and_covariance_match_at_d32_with_200k_draws(precision):
    d, copies, per = 32, 8, 25_000  # 200 000 draws
    # own class with 5 features; neighbours with 40 and 60 features and one with a single feature
    args = request(*make_problem([5, 40, 60, 1], d=d), own=0, nbrs=[1, 2, 3], weights=[0.5, 0.3, 0.2],
                   copies=copies)
    x = calibrated_sample(*args, ALPHA, BETA, samples_per_source=per, seed=7,
                          precision=precision).reshape(-1, d).double()
    bank, offsets, centres, src, _, nbrs, w = args
    mu, cov = calibrated_moments(bank, offsets, centres, src[0], 0, nbrs[0], w[0], ALPHA, BETA)
    mean = x.mean(0)
    emp_cov = torch.cov(x.T)
    rel_frob = torch.linalg.norm(emp_cov - cov) / torch.linalg.norm(cov)
    assert rel_frob <= 0.02, f"covariance relative Frobenius error {rel_frob:.4f}"
    z = (mean - mu) / (cov.diagonal() / x.shape[0]).sqrt()
    assert z.abs().max() < 5.0, f"mean off by {z.abs().max():.2f} standard errors"
    assert torch.linalg.norm(mean - mu) / torch.linalg.norm(mu) <= 0.02


def test_factor_path_and_dense_path_agree_in_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    d, n = 8, 20_000
    args = request(*make_problem([2, 30, 12], d=d, seed=3), own=0, nbrs=[1, 2], weights=[0.7, 0.3])
    fast = calibrated_sample(*args, ALPHA, BETA, samples_per_source=n, seed=11)[0].double()
    dense = calibrated_sample_dense(*args, ALPHA, BETA, samples_per_source=n,
                                    generator=torch.Generator().manual_seed(5))[0].double()
    cov_f, cov_d = torch.cov(fast.T), torch.cov(dense.T)
    assert torch.linalg.norm(cov_f - cov_d) / torch.linalg.norm(cov_d) < 0.05
    proj = torch.randn(d, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for j in range(4):
        p = scipy_stats.ks_2samp((fast @ proj[:, j]).numpy(), (dense @ proj[:, j]).numpy()).pvalue
        assert p > 1e-3, f"projection {j}: KS p-value {p:.2e}"


def test_class_counts_1_2_5_give_finite_samples():
    bank, offsets, centres = make_problem([1, 2, 5], d=24)
    for own in range(3):
        nbrs = [c for c in range(3) if c != own]
        x = calibrated_sample(*request(bank, offsets, centres, own, nbrs, [0.5, 0.5], copies=3), ALPHA, BETA,
                              samples_per_source=50, seed=0)
        assert torch.isfinite(x).all()
    # own class of one feature and β = 0, single-feature neighbour: no spread at all, x = μ exactly
    x = calibrated_sample(*request(bank, offsets, centres, 0, [0], [1.0]), ALPHA, 0.0, samples_per_source=4,
                          seed=0)
    mu = (1 - ALPHA) * bank[0] + ALPHA * centres[0]
    torch.testing.assert_close(x[0], mu.expand(4, -1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.__setitem__(3, a[3].clone().index_fill_(1, torch.tensor([0]), float("nan"))),
         "source feature 0 contains NaN"),
        (lambda a: a.__setitem__(0, a[0].clone().index_fill_(0, torch.tensor([3]), float("nan"))),
         "bank features of class 1 contain NaN"),
        (lambda a: a.__setitem__(5, torch.tensor([[1, 9]])), "outside"),
        (lambda a: a.__setitem__(1, torch.tensor([0, 2, 2, 8])), "no samples"),
    ],
    ids=["nan-source", "nan-bank-row", "neighbour-out-of-range", "empty-class"],
)
def test_bad_input_is_named(change, message):
    bank, offsets, centres = make_problem([2, 4, 2], d=4)
    args = list(request(bank, offsets, centres, 0, [1, 2], [0.5, 0.5]))
    change(args)
    with pytest.raises(ValueError, match=message):
        calibrated_sample(*args, ALPHA, BETA, samples_per_source=2, seed=0)


def test_meta_implementation_gives_the_shape():
    meta = torch.device("meta")
    out = torch.ops.ltdist.calibrated_sample(
        torch.empty(10, 6, device=meta), torch.empty(4, dtype=torch.long, device=meta),
        torch.empty(3, 6, device=meta), torch.empty(5, 6, device=meta), torch.empty(5, dtype=torch.long, device=meta),
        torch.empty(5, 2, dtype=torch.long, device=meta), torch.empty(5, 2, device=meta), 0.4, 0.05, 9, 0)
    assert out.shape == (5, 9, 6) and out.device.type == "meta"


@pytest.mark.parametrize(("index", "dtype", "message"), [
    (6, torch.float64, "calibrated_sample: weights must be Float, got Double"),
    (4, torch.int32, "calibrated_sample: source_class must be Long, got Int"),
    (0, torch.float16, "calibrated_sample: bank must be Float, got Half"),
], ids=["weights-fp64", "source_class-int32", "bank-fp16"])
def test_extension_names_the_argument_with_a_wrong_dtype(index, dtype, message):
    bank, offsets, centres = make_problem([2, 4, 2], d=4)
    args = list(request(bank, offsets, centres, 0, [1, 2], [0.5, 0.5]))
    args[index] = args[index].to(dtype)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ltdist.calibrated_sample(*args, ALPHA, BETA, 2, 0)


def test_tensors_on_two_devices_are_named():
    bank, offsets, centres = make_problem([2, 4, 2], d=4)
    args = list(request(bank, offsets, centres, 0, [1, 2], [0.5, 0.5]))
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match=r"calibrated_sample: all tensors must be on one device, .*source on meta"):
        calibrated_sample(*args, ALPHA, BETA, samples_per_source=2, seed=0)
