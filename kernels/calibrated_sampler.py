"""Calibrated Gaussian feature sampling for MPFA (paper 2, §3.3; README.md "How it works: MPDT").

Each request s (a real feature z̃_s of class o_s, with M neighbour classes k_sm and weights w_sm)
gets R draws from N(μ_s, Σ_s) with
    μ_s = (1−α) z̃_s + α Σ_m w_sm ĉ_{k_sm}
    Σ_s = (1−α)² Σ_{o_s} + α² Σ_m w_sm Σ_{k_sm} + β I,   Σ_k = (Z_k − ĉ_k)ᵀ(Z_k − ĉ_k) / (N_k − 1)
(eqs. 9–10; the weights are used as given: pass softmax weights, or softmax/M for the paper's literal
form). A class with N_k = 1 has Σ_k = 0. The fast path (``torch.ops.ltdist.calibrated_sample``, C++ on
ATen: CPU and CUDA when built with it) samples through the factors A_k = (Z_k − ĉ_k)ᵀ/√(N_k−1): memory is
the bank itself, no d×d matrix, and all draws of a call that use class k are one GEMM with Z_k (MKL on
CPU, cuBLAS on CUDA). :func:`calibrated_sample_dense` builds Σ and uses Cholesky (the reference, small d
only).
"""

from __future__ import annotations

import contextlib

import torch
from ltdist.kernels._dispatch import check_same_device

from ltdist.extension import group_by_class, load_extension


def group_bank(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
               in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature bank grouped by class: (bank [N,d] float32, offsets [C+1] int64) from features [N,d] and
    labels [N]; class c owns rows offsets[c]:offsets[c+1], in input order.

    ``in_place``: a contiguous float32 CPU ``features`` is reordered in place and returned as the bank
    (no second copy: the set-up peak is one bank); other inputs are copied as without it."""
    order, offsets = group_by_class(labels.cpu(), num_classes)
    if in_place and features.is_cpu and features.dtype == torch.float32 and features.is_contiguous():
        torch.ops.ltdist.permute_rows_(features, order)
        return features, offsets
    return features[order.to(features.device)].float().contiguous(), offsets.to(features.device)


def check_sampler_inputs(bank: torch.Tensor, offsets: torch.Tensor, source_class: torch.Tensor,
                         neighbours: torch.Tensor, weights: torch.Tensor, alpha: float, beta: float) -> None:
    """Raise ``ValueError`` naming the first problem in the index/weight inputs (shapes are checked in C++).

    Costs O(C + S·M), not O(bank): NaN/Inf in the features is diagnosed after sampling
    (:func:`diagnose_non_finite`), only when it reached the samples."""
    if offsets.dim() != 1 or offsets.numel() < 2 or int(offsets[0]) != 0 or int(offsets[-1]) != bank.shape[0] \
            or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"calibrated_sample: offsets must be non-decreasing from 0 to the bank size "
                         f"{bank.shape[0]}, got {offsets.tolist()[:8]}…")
    num_classes = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    for name, ids in (("source_class", source_class), ("neighbours", neighbours)):
        bad = (ids < 0) | (ids >= num_classes)
        if bool(bad.any()):
            raise ValueError(f"calibrated_sample: {name} has class id {int(ids[bad][0])} outside "
                             f"[0, {num_classes})")
        empty = counts[ids] == 0
        if bool(empty.any()):
            raise ValueError(f"calibrated_sample: {name} refers to class {int(ids[empty][0])}, which has no "
                             f"samples in the bank")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("calibrated_sample: neighbour weights must be finite and >= 0")
    if not 0.0 <= alpha <= 1.0 or beta < 0.0:
        raise ValueError(f"calibrated_sample: need 0 <= alpha <= 1 and beta >= 0, got alpha={alpha}, beta={beta}")


def diagnose_non_finite(bank: torch.Tensor, offsets: torch.Tensor, centres: torch.Tensor, source: torch.Tensor,
                        source_class: torch.Tensor, neighbours: torch.Tensor) -> ValueError:
    """The error to raise when samples came out NaN/Inf: names the input (and class) that caused it."""
    bad_rows = ~torch.isfinite(source).all(1)
    if bool(bad_rows.any()):
        return ValueError(f"calibrated_sample: source feature {int(bad_rows.nonzero()[0])} contains NaN or Inf")
    for c in torch.unique(torch.cat([source_class, neighbours.flatten()])).tolist():
        if not bool(torch.isfinite(centres[c]).all()):
            return ValueError(f"calibrated_sample: centre of class {c} contains NaN or Inf")
        if not bool(torch.isfinite(bank[int(offsets[c]):int(offsets[c + 1])]).all()):
            return ValueError(f"calibrated_sample: bank features of class {c} contain NaN or Inf")
    return ValueError("calibrated_sample: samples are not finite (overflow: are the features huge?)")


PRECISIONS = ("fp32", "tf32", "bf16")  # GEMM input precision; accumulation is fp32 in all three


def default_precision(device: torch.device) -> str:
    """The fastest precision whose moments pass the eq. 10 test: tf32 on CUDA, fp32 on CPU (bf16 passes too,
    but without AVX-512 BF16 it is slower than fp32 on a CPU)."""
    return "tf32" if device.type == "cuda" else "fp32"


def calibrated_sample(bank: torch.Tensor, offsets: torch.Tensor, centres: torch.Tensor, source: torch.Tensor,
                      source_class: torch.Tensor, neighbours: torch.Tensor, weights: torch.Tensor,
                      alpha: float, beta: float, samples_per_source: int, seed: int,
                      streams: torch.Tensor | None = None, beta_shared: float = 0.0,
                      precision: str = "fp32") -> torch.Tensor:
    """Draw ``samples_per_source`` calibrated features per request (factor path, exact distribution).

    Args:
        bank: [rows, d] float32 features grouped by class (see :func:`group_bank`).
        offsets: [C+1] int64, class c owns ``bank[offsets[c]:offsets[c+1]]``.
        centres: [C, d] float32 class centres ĉ_c (meta-prototypes).
        source: [S, d] float32 source features z̃_s.
        source_class: [S] int64 class of each source feature (its own covariance).
        neighbours: [S, M] int64 neighbour classes; weights: [S, M] float32 their weights w_sm.
        alpha, beta: calibration strength α ∈ [0,1] and isotropic variance β ≥ 0.
        samples_per_source: R; seed: draw r of request s is a pure function of (seed, streams[s], r) (up to
            the GEMM's rounding): the same for any thread count, any grouping of requests into calls, and
            on CPU and CUDA, which use the same counter-based stream.
        streams: [S] int64 stream ids of the requests (default: their positions 0..S−1).
        beta_shared: β_s ≥ 0: one shared normal per draw times √β_s added to every coordinate (β_s·11ᵀ).
        precision: GEMM inputs in ``fp32``, ``tf32`` (CUDA only) or ``bf16``, accumulated in fp32.
    Returns:
        [S, R, d] float32 on the device of ``bank``.
    Raises:
        ValueError: naming the problem — tensors on different devices, class id out of range, a referenced
            class with no bank rows, negative/non-finite weights, bad offsets, or NaN/Inf in the source, centre
            or bank rows used.
    """
    check_same_device("calibrated_sample", bank=bank, offsets=offsets, centres=centres, source=source,
                      source_class=source_class, neighbours=neighbours, weights=weights)
    check_sampler_inputs(bank, offsets, source_class, neighbours, weights, alpha, beta)
    if precision not in PRECISIONS or (precision == "tf32" and bank.device.type != "cuda"):
        raise ValueError(f"calibrated_sample: precision must be one of {PRECISIONS} (tf32 on CUDA only), got "
                         f"{precision!r} for a bank on {bank.device}")
    if beta_shared < 0:
        raise ValueError(f"calibrated_sample: beta_shared must be >= 0, got {beta_shared}")
    load_extension()
    tf32 = contextlib.nullcontext()
    if bank.device.type == "cuda":  # cuBLAS takes TF32 from torch's global flag: set it for this call only
        tf32 = _allow_tf32(precision == "tf32")
    with tf32:
        out = torch.ops.ltdist.calibrated_sample(bank, offsets, centres, source, source_class, neighbours, weights,
                                                 float(alpha), float(beta), int(samples_per_source), int(seed),
                                                 streams, float(beta_shared), precision)
    if not bool(torch.isfinite(out).all()):  # O(output): NaN features that matter always reach the samples
        raise diagnose_non_finite(bank, offsets, centres, source, source_class, neighbours)
    return out


@contextlib.contextmanager
def _allow_tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def calibrated_moments(bank: torch.Tensor, offsets: torch.Tensor, centres: torch.Tensor, source: torch.Tensor,
                       source_class: int, neighbours: torch.Tensor, weights: torch.Tensor, alpha: float,
                       beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (μ [d], Σ [d,d]) in float64 for one request: source [d], neighbours [M], weights [M]."""
    def class_cov(c: int) -> torch.Tensor:
        z = bank[int(offsets[c]):int(offsets[c + 1])].double() - centres[c].double()
        if z.shape[0] <= 1:
            return torch.zeros(bank.shape[1], bank.shape[1], dtype=torch.float64, device=bank.device)
        return z.T @ z / (z.shape[0] - 1)

    w = weights.double()
    mu = (1 - alpha) * source.double() + alpha * (w[:, None] * centres[neighbours].double()).sum(0)
    cov = (1 - alpha) ** 2 * class_cov(source_class) + beta * torch.eye(bank.shape[1], dtype=torch.float64,
                                                                          device=bank.device)
    for k, wk in zip(neighbours.tolist(), w.tolist()):
        cov += alpha**2 * wk * class_cov(k)
    return mu, cov


def calibrated_sample_dense(bank: torch.Tensor, offsets: torch.Tensor, centres: torch.Tensor, source: torch.Tensor,
                            source_class: torch.Tensor, neighbours: torch.Tensor, weights: torch.Tensor,
                            alpha: float, beta: float, samples_per_source: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Reference: build Σ_s (d×d), Cholesky, sample. Same arguments and result shape as
    :func:`calibrated_sample` (a generator instead of a seed); needs β > 0 so that Σ_s is definite."""
    check_sampler_inputs(bank, offsets, source_class, neighbours, weights, alpha, beta)
    if beta <= 0:
        raise ValueError("calibrated_sample_dense: needs beta > 0 (Cholesky of a possibly singular Σ)")
    out = []
    for s in range(source.shape[0]):
        mu, cov = calibrated_moments(bank, offsets, centres, source[s], int(source_class[s]), neighbours[s],
                                     weights[s], alpha, beta)
        eps = torch.randn(samples_per_source, mu.numel(), dtype=torch.float64, generator=generator)
        out.append(mu + eps.to(mu.device) @ torch.linalg.cholesky(cov).T)
    return torch.stack(out).float()
