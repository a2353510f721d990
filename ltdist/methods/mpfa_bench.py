"""MPFA at iNaturalist scale: ``python -m ltdist.methods.mpfa_bench --out mpfa_bench.json``.

A synthetic bank shaped like iNaturalist-2018 (8142 classes, 437 513 features, counts from 1000 down
to 2 on a Pareto-like profile, d = 2048, non-negative features) goes through the mpfa stage's own
functions: the MPFA-space bank (:func:`ltdist.methods.mpfa.build_bank`), empirical centres,
neighbours, the generation plan, then a fixed number of generation batches and retrain steps.
Reported (and written as JSON):

- peak and steady resident memory against the bank size (no d×d matrix per class, no generated set);
- generated features per second, alone and inside retrain steps (generation + forward/backward);
- the sampler's achieved GFLOP/s (2·d·rows of every class term it runs) as a fraction of
  ``torch.matmul`` doing the same FLOPs in the same run, both as one large GEMM and in the
  [1, n] × [n, d] shape the sampler runs per draw;
- the neighbour search's time (measured on ``--neighbour-rows`` rows, extrapolated to the bank).

The neighbour search is a [rows, C] × d similarity (≈ 15 TFLOP for the full bank), so by default only
a sample of rows gets neighbours and the measured draws come from those rows (``--neighbour-rows 0``:
all rows, as the stage does).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from ltdist.data.formats.longtail import counts_with_total
from ltdist.methods.mpfa import (
    AugmentationPlan,
    build_bank,
    draw_features,
    empirical_centres,
    generation_counts,
    select_neighbours,
)
from ltdist.methods.mpfa_retrain import RetrainClassifier, RetrainSettings, make_optimizer, train_step

GIB = 2**30


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * resource.getpagesize()
    return current / GIB, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def synthetic_features(counts: torch.Tensor, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative features [N, dim] float32 in shuffled class order (as extracted) and labels [N]."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    means = torch.rand(counts.numel(), dim, generator=gen)
    features = torch.empty(labels.numel(), dim)
    for start in range(0, labels.numel(), 65536):
        rows = labels[start:start + 65536]
        noise = 0.5 * torch.randn(rows.numel(), dim, generator=gen)
        features[start:start + rows.numel()] = (means[rows] + noise).relu_()
    return features, labels


def sampler_flops(plan: AugmentationPlan, sources: torch.Tensor) -> float:
    """FLOPs the sampler runs for one draw per source: 2·d·n for every class term with n > 1 rows."""
    counts = plan.offsets[1:] - plan.offsets[:-1]
    terms = torch.cat([plan.labels[sources][:, None], plan.neighbours[sources]], dim=1)
    rows = counts[terms]
    return float(2 * plan.bank.shape[1] * (rows * (rows > 1)).sum())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_gflops(flops: float, dim: int, n: int) -> dict[str, float]:
    """torch.matmul GFLOP/s on ``flops``: as one large GEMM, and as the sampler runs them — per draw a
    [1, n] × [n, d] product with another class's rows (16 distinct matrices, so each streams from memory)."""
    b = torch.randn(n, dim)
    m = max(1, round(flops / (2 * n * dim)))
    a = torch.randn(m, n)
    torch.matmul(a[:8], b)  # warm-up
    gemm = timed(lambda: torch.matmul(a, b))
    stack, rows = torch.randn(16, n, dim), torch.randn(16, 1, n)
    reps = max(1, round(flops / (2 * n * dim * 16)))
    torch.matmul(rows, stack)
    gemv = timed(lambda: [torch.matmul(rows, stack) for _ in range(reps)])
    return {"gemm": 2 * m * n * dim / gemm / 1e9, "gemv": 2 * 16 * reps * n * dim / gemv / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("mpfa_bench.json"))
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--total", type=int, default=437_513)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--neighbours", type=int, default=3)
    parser.add_argument("--neighbour-rows", type=int, default=8192, help="rows searched (0: all)")
    parser.add_argument("--batches", type=int, default=3, help="generation batches and retrain steps timed")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--group", type=int, default=1, help="method.mpfa.group_draws: draws per source and call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads()}
    result["rss_start_gib"] = rss_gib()[0]

    counts = torch.tensor(counts_with_total(args.classes, args.total, 1000, 2))
    raw, labels = synthetic_features(counts, args.dim, args.seed)
    result["bank_gib"] = raw.numel() * 4 / GIB
    result["rss_after_features_gib"] = rss_gib()[0]
    start = time.perf_counter()
    bank, offsets = build_bank(raw, labels, args.classes, 0.5)
    del raw  # the stage releases the raw features the same way
    centres = empirical_centres(bank, offsets)
    result["bank_and_centres_s"] = time.perf_counter() - start
    per_source = generation_counts(counts, "balanced")
    bank_labels = torch.repeat_interleave(torch.arange(args.classes), counts)
    gen = torch.Generator().manual_seed(args.seed)
    generating = per_source > 0
    if args.neighbour_rows:
        searched = generating.nonzero().flatten()
        searched = searched[torch.randperm(searched.numel(), generator=gen)[:args.neighbour_rows]]
        generating = torch.zeros_like(generating).index_fill_(0, searched, True)
    start = time.perf_counter()
    neighbours, weights = select_neighbours(bank, bank_labels, centres, counts, generating, args.neighbours, False)
    search_s = time.perf_counter() - start
    all_generating = int((per_source > 0).sum())
    result["neighbour_search"] = {"rows": int(generating.sum()), "seconds": search_s,
                                  "extrapolated_all_rows_s": search_s * all_generating / int(generating.sum())}
    plan = AugmentationPlan(bank=bank, offsets=offsets, labels=bank_labels, centres=centres, neighbours=neighbours,
                            weights=weights, per_source=per_source, cumulative=torch.cumsum(per_source, 0))
    result["generated_per_epoch"] = plan.generated
    result["items_per_epoch"] = plan.size
    result["rss_after_plan_gib"], result["peak_rss_after_plan_gib"] = rss_gib()

    # sources of generated features among the searched rows, in proportion to what they generate;
    # each makes ``--group`` features per sampler call
    weight = (per_source * generating).double()
    per_batch = max(1, args.batch_size // args.group)
    draws = [torch.multinomial(weight, per_batch, replacement=True, generator=gen) for _ in range(args.batches)]
    flops = args.group * sum(sampler_flops(plan, s) for s in draws)
    draw_features(plan, draws[0][:16], alpha=0.4, beta=0.05, beta_form="identity", seed=0)  # warm-up
    gen_s = timed(lambda: [draw_features(plan, s, alpha=0.4, beta=0.05, beta_form="identity", seed=i,
                                         draws=args.group) for i, s in enumerate(draws)])
    sampler_gflops = flops / gen_s / 1e9
    typical_rows = int((offsets[1:] - offsets[:-1])[plan.neighbours[draws[0]]].float().mean())
    reference = matmul_gflops(flops / args.batches, args.dim, typical_rows)
    drawn = args.batches * per_batch * args.group
    result["sampler"] = {"draws": drawn, "seconds": gen_s, "features_per_s": drawn / gen_s, "gflop": flops / 1e9,
                         "gflop_per_s": sampler_gflops, "matmul_gflop_per_s": reference,
                         "fraction_of_gemm": sampler_gflops / reference["gemm"],
                         "fraction_of_gemv": sampler_gflops / reference["gemv"],
                         "mean_neighbour_rows": typical_rows}

    # retrain steps: real rows and runs of generated features of the drawn sources, in the epoch's proportion
    settings = RetrainSettings(classifier="cosine", scale=16.0, epochs=1, batch_size=args.batch_size, lr=0.05,
                               momentum=0.9, weight_decay=5e-4, alpha=0.4, beta=0.05, beta_form="identity",
                               tukey=0.5, seed=args.seed, group_draws=args.group)
    model = RetrainClassifier(args.classes, args.dim, settings)
    optimizer = make_optimizer(model, settings)
    real_share = plan.num_real / plan.size
    batches = []
    for s in draws:
        back = torch.arange(args.group)[None, :] % per_source[s][:, None]  # a run of the source's last ids
        generated = (plan.num_real + plan.cumulative[s][:, None] - 1 - back).flatten()
        num_real = round(generated.numel() * real_share)
        real_rows = torch.randint(plan.num_real, (num_real,), generator=gen)
        batches.append(torch.cat([generated[:generated.numel() - num_real], real_rows]))
    train_step(model, optimizer, plan, settings, batches[0][:64], 0, -1, 0, 1)  # warm-up (lazy imports)
    step_s = timed(lambda: [train_step(model, optimizer, plan, settings, items, 0, b, 0, 1)
                            for b, items in enumerate(batches)])
    items_per_s = args.batches * args.batch_size / step_s
    result["retrain"] = {"steps": args.batches, "seconds": step_s, "items_per_s": items_per_s,
                         "generated_per_s": items_per_s * (1 - real_share),
                         "epoch_hours_estimate": plan.size / items_per_s / 3600}
    result["rss_end_gib"], result["peak_rss_gib"] = rss_gib()
    result["peak_over_bank"] = result["peak_rss_gib"] / result["bank_gib"]
    result["avoided"] = {"dense_class_covariances_gib": args.classes * args.dim**2 * 4 / GIB,
                         "materialised_generated_gib": plan.generated * args.dim * 4 / GIB}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
