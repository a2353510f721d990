"""Autotuning with several configs under the interpreter: the first call of a new shape tunes on the real
buffers, so a kernel that accumulates into its output must have each trial undone (restore_value)."""

import os
import time

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from ltdist.kernels import _triton_matmul as tm  # noqa: E402
from ltdist.kernels import cosine_logits_triton  # noqa: E402
from ltdist.kernels.cosine_logits import cosine_cross_entropy_reference, cosine_logits_reference  # noqa: E402
from ltdist.kernels.kt_attention import kt_attention_reference  # noqa: E402
from ltdist.kernels.kt_attention_triton import kt_attention_triton  # noqa: E402

# two interpreter-sized tiles: enough for the autotuner to benchmark (and so run the kernel) twice
TWO_CONFIGS = [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=1, num_stages=1),
               triton.Config({"BM": 32, "BN": 16, "BK": 32}, num_warps=1, num_stages=1)]


def wall_clock_bench(kernel_call, quantiles):
    """Stand-in for triton.testing.do_bench where no GPU timer exists: a warm-up call and two timed calls,
    each on the real buffers, as do_bench does."""
    kernel_call()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        kernel_call()
        times.append(1e3 * (time.perf_counter() - t0))
    return [sorted(times)[len(times) // 2]] * len(quantiles)


@pytest.fixture
def two_configs(monkeypatch):
    """Both matmul kernels autotune over two configs, with an empty tuning cache (every shape is new)."""
    for kernel in (tm._cosine_matmul_kernel, tm._scaled_gmm_kernel):
        monkeypatch.setattr(kernel, "configs", TWO_CONFIGS)
        monkeypatch.setattr(kernel, "cache", {})
        if DEVICE == "cpu":
            monkeypatch.setitem(vars(kernel), "do_bench", wall_clock_bench)  # do_bench: a cached_property
    return TWO_CONFIGS


def test_accumulate_on_the_first_call_adds_once(two_configs):
    g = torch.Generator().manual_seed(0)
    G, Y = torch.randn(20, 24, generator=g), torch.randn(24, 18, generator=g)
    a, c = torch.rand(20, generator=g) + 0.5, torch.rand(24, generator=g) + 0.5
    start = torch.randn(20, 18, generator=g)
    out = start.clone().to(DEVICE)
    tm.scaled_gmm(G.to(DEVICE), Y.to(DEVICE), a.to(DEVICE), c.to(DEVICE), out=out, accumulate=True)
    assert len(tm._scaled_gmm_kernel.cache) == 1  # it did tune (two configs, a new key)
    expected = start + a[:, None] * ((G * c[None, :]) @ Y)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_elements", [1 << 21, 64], ids=["one-chunk", "many-chunks"])
def test_fused_cross_entropy_grads_on_the_first_call_of_a_shape(two_configs, chunk_elements, monkeypatch):
    monkeypatch.setattr(cosine_logits_triton, "CE_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(1)
    B, N, F = 21, 19, 35
    x = torch.randn(B, F, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(N, F, generator=g).to(DEVICE).requires_grad_()
    s = torch.tensor(6.0, device=DEVICE).requires_grad_()
    labels = torch.randint(0, N, (B,), generator=g).to(DEVICE)
    fast = cosine_logits_triton.CosineCrossEntropy.apply(x, w, s, labels)
    ref = cosine_cross_entropy_reference(x, w, s, labels)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(fast, (x, w, s)), torch.autograd.grad(ref, (x, w, s))):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_cosine_logits_and_kt_attention_on_the_first_call_of_a_shape(two_configs):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(17, 33, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(22, 33, generator=g).to(DEVICE).requires_grad_()
    s = torch.tensor(5.0, device=DEVICE).requires_grad_()
    up = torch.randn(17, 22, generator=g).to(DEVICE)
    fast = cosine_logits_triton.CosineLogits.apply(x, w, s)
    ref = cosine_logits_reference(x, w, s)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)
    for got, want in zip(torch.autograd.grad((fast * up).sum(), (x, w, s)),
                         torch.autograd.grad((ref * up).sum(), (x, w, s))):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    counts = torch.randint(1, 40, (22,), generator=g)
    for got, want in zip(kt_attention_triton(w.detach(), w.detach().flip(0), counts.to(DEVICE), [0, 10], 10.0),
                         kt_attention_reference(w.detach().cpu(), w.detach().cpu().flip(0), counts, [0, 10], 10.0)):
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_pruner_on_a_gpu_compiles_each_candidate_and_keeps_those_that_fit(monkeypatch):
    """The pruner's GPU path with a stub kernel: the dtype's tiles, compiled with the launch's constexprs
    (not the autotuner's grid/warmup), kept when their shared memory fits the device."""
    from types import SimpleNamespace

    from ltdist.kernels import _autotune

    monkeypatch.setattr(_autotune, "INTERPRET", False)
    monkeypatch.setattr(_autotune, "shared_memory_limit", lambda index: 166_912)
    pruner = _autotune.TilePruner("y_ptr", fp32_tiles=[(32, 32, 32, 4, 2)],
                                  tc_tiles=[(128, 128, 32, 8, 3), (64, 64, 64, 4, 3)])
    compiled = []

    def warmup(*, grid, **kw):
        compiled.append(kw)
        return SimpleNamespace(metadata=SimpleNamespace(shared=200_000 if kw["BM"] == 128 else 50_000))

    pruner.kernel = SimpleNamespace(warmup=warmup, __name__="_stub_kernel")
    y = SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda", 0))
    kept = pruner(pruner.configs, {"y_ptr": y, "M": 7}, EXP=True, grid=lambda meta: (1,), warmup=False)
    assert [c.kwargs["BM"] for c in kept] == [64]
    assert [(c["BM"], c["EXP"], c["M"], c["num_warps"]) for c in compiled] == [(128, True, 7, 8), (64, True, 7, 4)]
    assert all("warmup" not in c for c in compiled)
