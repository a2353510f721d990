"""Benchmark cases of ``ltdist bench kernels`` (:mod:`ltdist.bench.kernels`): for each op and shape, the implementations
to time (fast path, eager PyTorch, torch.compile, and op-specific baselines) with FLOP and byte counts
for the roofline. Each implementation is a zero-argument callable; tensors are created once per case."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ltdist.kernels._dispatch import triton_available
from ltdist.kernels.calibrated_sampler import calibrated_sample, calibrated_sample_dense, group_bank
from ltdist.kernels.cosine_logits import cosine_cross_entropy_reference, cosine_logits_reference
from ltdist.kernels.kt_attention import kt_attention_reference
from ltdist.kernels.prototype_ema import prototype_ema_reference

KT_KS = (0, 20, 100)
SAMPLES_PER_SOURCE, NEIGHBOURS = 18, 3  # iNaturalist-shaped MPFA workload (distribution calibration)

SHAPES = {
    "quick": dict(cosine=[(64, 1000, 512)], ce=[(64, 1000, 512)], kt=[(1000, 512)], ema=[(512, 1000, 512)],
                  sampler=[64, 512], sampler_sources=8),
    "default": dict(cosine=[(64, 1000, 2048), (256, 1000, 2048)], ce=[(256, 1000, 2048)], kt=[(1000, 2048)],
                    ema=[(512, 1000, 2048), (4096, 1000, 2048)], sampler=[64, 512, 2048], sampler_sources=16),
    "full": dict(cosine=[(b, n, 2048) for b in (64, 256, 512) for n in (1000, 8142)],
                 ce=[(b, n, 2048) for b in (64, 256, 512) for n in (1000, 8142)],
                 kt=[(1000, 2048), (8142, 2048)], ema=[(512, 8142, 2048), (4096, 8142, 2048)],
                 sampler=[64, 512, 2048], sampler_sources=64),
}


@dataclass
class Case:
    op: str
    shape: str
    impls: dict[str, Callable[[], object]]
    flops: float  # useful floating-point operations of one call
    bytes: float  # minimum HBM/DRAM traffic of one call
    # units of work per call of each implementation (sources for the sampler; default 1), so that
    # implementations timed on different amounts of work compare per unit
    units: dict[str, int] = field(default_factory=dict)
    notes: dict[str, float] = field(default_factory=dict)


def _compiled(fn: Callable, enabled: bool) -> Callable | None:
    return torch.compile(fn, dynamic=False) if enabled else None


def _add(impls: dict, name: str, fn: Callable | None) -> None:
    if fn is not None:
        impls[name] = fn


def _fast(device: torch.device) -> bool:
    return device.type == "cuda" and triton_available()


def cosine_cases(shapes, dtype, device, compile_: bool) -> Iterator[Case]:
    from ltdist.kernels.cosine_logits import cosine_logits  # dispatcher: Triton on CUDA

    es = torch.finfo(dtype).bits // 8
    for B, N, F_ in shapes:
        x, w = torch.randn(B, F_, device=device, dtype=dtype), torch.randn(N, F_, device=device, dtype=dtype)
        s = torch.tensor(16.0, device=device)
        impls: dict = {}
        if _fast(device):
            impls["fast"] = lambda x=x, w=w, s=s: cosine_logits(x, w, s)
        impls["eager"] = lambda x=x, w=w, s=s: cosine_logits_reference(x, w, s)
        comp = _compiled(cosine_logits_reference, compile_)
        _add(impls, "compile", comp and (lambda x=x, w=w, s=s, c=comp: c(x, w, s)))
        yield Case("cosine_logits", f"B={B} N={N} F={F_} {dtype}", impls, 2.0 * B * N * F_,
                   es * ((B + N) * F_ + B * N))


def ce_cases(shapes, dtype, device, compile_: bool) -> Iterator[Case]:
    from ltdist.kernels.cosine_logits import cosine_cross_entropy

    es = torch.finfo(dtype).bits // 8
    for B, N, F_ in shapes:
        x = torch.randn(B, F_, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(N, F_, device=device, dtype=dtype, requires_grad=True)
        s = torch.tensor(16.0, device=device, requires_grad=True)
        y = torch.randint(0, N, (B,), device=device)

        def step(fn, x=x, w=w, s=s, y=y):
            return torch.autograd.grad(fn(x, w, s, y), (x, w, s))

        impls: dict = {}
        if _fast(device):
            impls["fast"] = functools.partial(step, cosine_cross_entropy)
        impls["eager"] = functools.partial(step, cosine_cross_entropy_reference)
        comp = _compiled(cosine_cross_entropy_reference, compile_)
        _add(impls, "compile", comp and functools.partial(step, comp))
        yield Case("cosine_ce_fwd_bwd", f"B={B} N={N} F={F_} {dtype}", impls, 6.0 * B * N * F_,
                   es * 2 * (B + N) * F_)


def kt_cases(shapes, device, compile_: bool) -> Iterator[Case]:
    from ltdist.kernels.kt_attention import kt_attention

    for N, F_ in shapes:
        p, w = torch.randn(N, F_, device=device), torch.randn(N, F_, device=device)
        counts = torch.randint(1, 1000, (N,), device=device)
        impls: dict = {}
        if _fast(device):
            impls["fast"] = lambda p=p, w=w, c=counts: kt_attention(p, w, c, KT_KS, 10.0)
        impls["eager"] = lambda p=p, w=w, c=counts: kt_attention_reference(p, w, c, KT_KS, 10.0)
        comp = _compiled(kt_attention_reference, compile_)
        _add(impls, "compile", comp and (lambda p=p, w=w, c=counts, f=comp: f(p, w, c, KT_KS, 10.0)))
        impls["two_matmuls"] = lambda p=p, w=w: (p @ w.T) @ w  # the cost floor named in the issue
        yield Case("kt_attention", f"N={N} F={F_} k={KT_KS}", impls, 4.0 * N * N * F_,
                   4 * (2 * N * F_ + 2 * len(KT_KS) * N * F_))


def ema_cases(shapes, device, compile_: bool) -> Iterator[Case]:
    from ltdist.kernels.prototype_ema import prototype_ema

    for B, C, F_ in shapes:
        protos = F.normalize(torch.randn(C, F_, device=device), dim=1)
        seen = torch.randint(0, 2000, (C,), device=device)  # both phases: running mean and eq. 1
        feats, labels = torch.randn(B, F_, device=device), torch.randint(0, C, (B,), device=device)
        present = int(torch.unique(labels).numel())
        impls: dict = {}
        if _fast(device):
            impls["fast"] = lambda p=protos, n=seen, f=feats, y=labels: prototype_ema(p, n, f, y, 0.999)
        impls["eager"] = lambda p=protos, n=seen, f=feats, y=labels: prototype_ema_reference(p, n, f, y, 0.999)
        comp = _compiled(prototype_ema_reference, compile_)
        _add(impls, "compile", comp and (lambda p=protos, n=seen, f=feats, y=labels, c=comp: c(p, n, f, y, 0.999)))
        # feats read once, touched prototype rows read + written, untouched rows copied
        yield Case("prototype_ema", f"B={B} C={C} F={F_}", impls, 3.0 * B * F_, 4 * (B * F_ + 2 * C * F_),
                   notes={"classes_in_batch": present})


def sampler_problem(d: int, sources: int, device: torch.device, seed: int = 0):
    """Tail sources (5 features in their class) with M = 3 neighbour classes of 100–1000 features."""
    g = torch.Generator().manual_seed(seed)
    head_counts = torch.randint(100, 1001, (3 * sources,), generator=g).tolist()
    counts = [5] * sources + head_counts
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    bank, offsets = group_bank(F.normalize(torch.randn(labels.numel(), d, generator=g), dim=1), labels, len(counts))
    centres = torch.stack([bank[offsets[c]:offsets[c + 1]].mean(0) for c in range(len(counts))])
    source = bank[offsets[:sources]]
    neighbours = (sources + torch.arange(3 * sources)).reshape(sources, 3)
    weights = torch.softmax(torch.randn(sources, 3, generator=g), dim=1)
    args = (bank, offsets, centres, source, torch.arange(sources), neighbours, weights)
    return tuple(t.to(device) for t in args)


def numpy_loop_factory(args, sources: int) -> Callable[[], object]:
    """Distribution-calibration baseline on the first ``sources`` requests: per source feature, the
    calibrated mean/cov from precomputed class covariances, then one numpy.random.multivariate_normal
    call of 18 samples."""
    bank, offsets, centres, source, own, neighbours, weights = (t.cpu().double().numpy() for t in args)
    source, own, neighbours, weights = source[:sources], own[:sources], neighbours[:sources], weights[:sources]
    offsets, neighbours = offsets.astype(np.int64), neighbours.astype(np.int64)

    def cov(c: int) -> np.ndarray:
        z = bank[offsets[c]:offsets[c + 1]] - centres[c]
        return z.T @ z / max(len(z) - 1, 1)

    covs = {int(c): cov(int(c)) for c in np.unique(np.concatenate([own.astype(np.int64), neighbours.ravel()]))}
    rng = np.random.default_rng(0)
    d = bank.shape[1]

    def run() -> None:
        for s in range(sources):
            nb, w = neighbours[s], weights[s]
            mu = 0.6 * source[s] + 0.4 * (w[:, None] * centres[nb]).sum(0)
            sigma = 0.36 * covs[int(own[s])] + 0.05 * np.eye(d)
            for k, wk in zip(nb, w):
                sigma += 0.16 * wk * covs[int(k)]
            rng.multivariate_normal(mu, sigma, size=SAMPLES_PER_SOURCE)

    return run


def matmul_factory(args) -> Callable[[], object]:
    """torch.matmul on the sampler's own GEMM shapes: per class term, [draws, N_k] normals × the class's
    bank rows (here every class is the term of one source, so draws = R)."""
    bank, offsets, _, _, own, neighbours, _ = args
    off = offsets.tolist()
    classes = torch.cat([own[:, None], neighbours], dim=1).flatten().tolist()
    pairs = [(torch.randn(SAMPLES_PER_SOURCE, off[c + 1] - off[c], device=bank.device), bank[off[c]:off[c + 1]])
             for c in classes]
    return lambda: [torch.matmul(e, z) for e, z in pairs]


def sampler_cases(dims, sources: int, device: torch.device, numpy_sources: Callable[[int], int]) -> Iterator[Case]:
    for d in dims:
        args = sampler_problem(d, sources, device)
        rows = int((args[1][1:] - args[1][:-1])[args[5]].sum() + 5 * sources)
        impls: dict = {"fast": lambda a=args: calibrated_sample(*a, 0.4, 0.05, SAMPLES_PER_SOURCE, 0),
                       "matmul": matmul_factory(args)}
        if d <= 512:
            impls["dense_cholesky"] = lambda a=args: calibrated_sample_dense(*a, 0.4, 0.05, SAMPLES_PER_SOURCE)
        units = {"fast": sources, "matmul": sources, "dense_cholesky": sources}
        if device.type == "cpu":
            units["numpy_loop"] = numpy_sources(d)
            impls["numpy_loop"] = numpy_loop_factory(args, units["numpy_loop"])
        yield Case("calibrated_sampler", f"d={d} S={sources} R={SAMPLES_PER_SOURCE} M={NEIGHBOURS}", impls,
                   2.0 * rows * SAMPLES_PER_SOURCE * d, 4 * (rows * d + sources * SAMPLES_PER_SOURCE * d),
                   units=units)
