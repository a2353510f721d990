"""Kernel microbenchmarks: ``ltdist bench kernels [--quick | --full] [--out DIR]``.

For each op and shape: median and p20/p80 time of the fast path (Triton / C++ / CUDA), eager PyTorch
and torch.compile, plus op baselines (two matmuls for KT attention; the per-source
``numpy.random.multivariate_normal`` loop, the dense Cholesky path and ``torch.matmul`` on the sampler's
own GEMM shapes, with the sampler's GFLOP/s as a fraction of it). On a GPU also
the roofline from the measured peak (large matmul, device copy) and % of roofline. Each implementation
is timed on its own: one warm-up call, then repeats until ``--budget`` seconds are spent
(:func:`ltdist.bench.harness.timed_rounds` with one loop). Writes ``results.json``, ``table.txt``,
``results.csv`` and ``times.png`` under ``--out``.

Shape sets: ``--quick`` (smoke), default (CPU: minutes on 2 cores; GPU: the issue's shapes), ``--full``
(the issue's shapes: B ∈ {64,256,512}, N ∈ {1000,8142}, F = 2048, KT N ∈ {1000,8142}, EMA B ∈
{512,4096}, sampler d ∈ {64,512,2048}).
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ltdist.bench import kernel_cases as cases
from ltdist.bench.harness import add_out_argument, summarise, timed_rounds, write_results

IMPL_ORDER = ["fast", "eager", "compile", "two_matmuls", "matmul", "dense_cholesky", "numpy_loop"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, budget_s: float, min_reps: int = 3,
              max_reps: int = 50) -> dict[str, float]:
    """Median, p20 and p80 seconds per call (``wall_s``, ``wall_p20_s``, ``wall_p80_s``) and ``reps``: one
    warm-up call (compilation, autotuning), then ``min_reps`` to ``max_reps`` repeats within ``budget_s`` (a
    single repeat when the warm-up alone exceeded the budget: the slow baselines)."""
    times = timed_rounds({"call": fn}, max_reps, warmup=1, sync=lambda: _sync(device), budget_s=budget_s,
                         min_steps=min_reps)
    return {**summarise(times, "call")["call"], "reps": len(times["call"]["wall"])}


def measure_peaks(device: torch.device) -> dict[str, float]:
    """Measured peak FLOP/s (4096³ matmul, fp32 IEEE and bf16) and copy bandwidth (1 GiB device copy)."""
    n = 8192 if device.type == "cuda" else 2048
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        t = time_call(lambda a=a, b=b: a @ b, device, budget_s=1.0)["wall_s"]
        peaks[f"flops_{name}"] = 2.0 * n**3 / t
    src = torch.empty(2**28 if device.type == "cuda" else 2**25, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, budget_s=1.0)["wall_s"]
    peaks["bytes_per_s"] = 2.0 * src.numel() * 4 / t
    return peaks


def collect(args: argparse.Namespace, device: torch.device) -> Iterator[cases.Case]:
    """The cases to run, created one at a time (each case's tensors are freed before the next)."""
    shapes = cases.SHAPES[args.shapes]
    compile_ = not args.no_compile
    # the numpy loop costs seconds per source at d = 2048: time few sources there
    numpy_sources = lambda d: max(1, min(shapes["sampler_sources"], 2 ** 12 // d))
    ops = set(args.ops)
    if "cosine_logits" in ops:
        for dtype in (torch.float32, torch.bfloat16):
            yield from cases.cosine_cases(shapes["cosine"], dtype, device, compile_)
    if "cosine_ce" in ops:
        yield from cases.ce_cases(shapes["ce"], torch.float32, device, compile_)
    if "kt_attention" in ops:
        yield from cases.kt_cases(shapes["kt"], device, compile_)
    if "prototype_ema" in ops:
        yield from cases.ema_cases(shapes["ema"], device, compile_)
    if "calibrated_sampler" in ops:
        yield from cases.sampler_cases(shapes["sampler"], shapes["sampler_sources"], device, numpy_sources)


def run_case(case: cases.Case, device: torch.device, peaks: dict[str, float] | None, budget_s: float,
             lines: list[str]) -> list[dict]:
    """The rows of one case's implementations; each row's line is printed and appended to ``lines``."""
    rows = []
    for impl in sorted(case.impls, key=IMPL_ORDER.index):
        t = time_call(case.impls[impl], device, budget_s)
        units = case.units.get(impl, 1)
        row = dict(op=case.op, shape=case.shape, impl=impl, units=units, reps=t["reps"],
                   median_ms=1e3 * t["wall_s"], p20_ms=1e3 * t["wall_p20_s"], p80_ms=1e3 * t["wall_p80_s"],
                   flops=case.flops, bytes=case.bytes, **case.notes)
        row["median_ms_per_unit"] = row["median_ms"] / units
        if peaks is not None and impl in ("fast", "compile", "two_matmuls"):
            peak = peaks["flops_bf16"] if "bfloat16" in case.shape else peaks["flops_fp32"]
            roof_s = max(case.flops / peak, case.bytes / peaks["bytes_per_s"])
            row["roofline_ms"] = 1e3 * roof_s
            row["pct_of_roofline"] = 100.0 * 1e3 * roof_s / row["median_ms"]
        rows.append(row)
        lines.append(f"{case.op:20s} {case.shape:38s} {impl:15s} median {row['median_ms']:10.3f} ms "
                     f"[p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}]"
                     + (f"  {row['pct_of_roofline']:.0f}% of roofline" if "pct_of_roofline" in row else ""))
        print(lines[-1], flush=True)
    return rows


def sampler_ratios(rows: list[dict], lines: list[str]) -> list[dict]:
    """Per shape: the sampler's GFLOP/s against torch.matmul on the same GEMM shapes (same run), and its
    per-source speed-up over the numpy loop; each printed and appended to ``lines``."""
    out = []
    by_shape: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["op"] == "calibrated_sampler":
            by_shape.setdefault(r["shape"], {})[r["impl"]] = r
    for shape, impls in by_shape.items():
        if "matmul" in impls:
            fast, ref = (impls[k]["flops"] / impls[k]["median_ms"] / 1e6 for k in ("fast", "matmul"))
            out.append(dict(shape=shape, gflop_per_s=fast, matmul_gflop_per_s=ref, fraction_of_matmul=fast / ref))
            lines.append(f"sampler {shape}: {fast:.1f} GFLOP/s, torch.matmul on the same shapes {ref:.1f} GFLOP/s "
                         f"→ {100 * fast / ref:.0f} %")
            print(lines[-1])
        if "numpy_loop" in impls:
            ratio = impls["numpy_loop"]["median_ms_per_unit"] / impls["fast"]["median_ms_per_unit"]
            out.append(dict(shape=shape, numpy_ms_per_source=impls["numpy_loop"]["median_ms_per_unit"],
                            fast_ms_per_source=impls["fast"]["median_ms_per_unit"], speedup=ratio))
            lines.append(f"sampler {shape}: numpy loop {impls['numpy_loop']['median_ms_per_unit']:.2f} ms/source, "
                         f"C++ {impls['fast']['median_ms_per_unit']:.4f} ms/source → {ratio:.0f}× faster")
            print(lines[-1])
    return out


def sampler_memory(d: int = 2048, features: int = 437_513, classes: int = 8142) -> dict[str, float]:
    """iNaturalist-sized sampler memory (analytic): the bank vs one d×d covariance per class."""
    # one class term of a call: its normals [draws, N_k] and its GEMM result [draws, d] (N_k = 1000)
    scratch = 4 * cases.SAMPLES_PER_SOURCE * (1000 + d)
    return dict(bank_gb=features * d * 4 / 1e9, per_class_covariances_gb=classes * d * d * 4 / 1e9,
                sampler_scratch_mb=scratch / 1e6)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["op"], r["shape"]) for r in rows}, key=lambda k: (k[0], k[1]))
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, key in enumerate(labels):
            hit = [r for r in rows if (r["op"], r["shape"]) == key and r["impl"] == impl]
            if hit:
                xs.append(i + j * width)
                ys.append(hit[0]["median_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call [ms]")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{op}\n{shape}" for op, shape in labels], rotation=60, ha="right", fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ltdist bench kernels", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="shapes", action="store_const", const="quick", help="smoke-test shapes")
    size.add_argument("--full", dest="shapes", action="store_const", const="full", help="the issue's shapes")
    parser.add_argument("--ops", nargs="+", default=["cosine_logits", "cosine_ce", "kt_attention", "prototype_ema",
                                                      "calibrated_sampler"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_out_argument(parser, "kernels")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.shapes is None:
        args.shapes = "full" if device.type == "cuda" else "default"
    args.out.mkdir(parents=True, exist_ok=True)

    peaks = measure_peaks(device) if device.type == "cuda" else None
    rows: list[dict] = []
    lines: list[str] = []
    for case in collect(args, device):
        rows += run_case(case, device, peaks, args.budget, lines)
    ratios = sampler_ratios(rows, lines)

    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                torch=torch.__version__, threads=torch.get_num_threads(), shapes=args.shapes, peaks=peaks,
                sampler_ratios=ratios, sampler_memory=sampler_memory())
    write_results(args.out, "kernels", args, "\n".join(lines), meta=meta, results=rows)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "times.png")
    print(f"wrote {args.out}/results.json, table.txt, results.csv, times.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
