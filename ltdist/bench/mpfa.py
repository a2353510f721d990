"""MPFA at iNaturalist scale: ``ltdist bench mpfa --out DIR``.

A synthetic bank shaped like iNaturalist-2018 (8142 classes, 437 513 features, counts from 1000 down
to 2 on a Pareto-like profile, d = 2048, non-negative features) goes through the mpfa stage's own
functions: the MPFA-space bank built in place (:func:`ltdist.methods.mpfa.build_bank`), empirical
centres, neighbours, the generation plan, then one draw window and a few retrain steps. Reported (printed
and written to ``DIR/results.json``):

- peak and steady resident memory against the bank size (no d×d matrix per class, no generated set);
- the sampler on one draw window (``--window`` generated features in one call, as the retrain draws
  them): features/s and GFLOP/s (2·d·rows of every class term), next to ``torch.matmul`` in the same
  run on the very GEMM shapes the call ran (one [rows_k, N_k] × [N_k, d] product per class) and on
  one large GEMM of the same FLOPs, with the ratios;
- the retrain: ``--steps`` classifier steps and the window's sampling and data movement, extrapolated
  to one epoch (balanced count) with the time split;
- the neighbour search's time (measured on ``--neighbour-rows`` rows, extrapolated to the bank).

The neighbour search is a [rows, C] × d similarity (≈ 15 TFLOP for the full bank), so by default only
a sample of rows gets neighbours and the measured draws come from those rows (``--neighbour-rows 0``:
all rows, as the stage does).
"""

from __future__ import annotations

import argparse
import json
import resource

import torch

from ltdist.bench.harness import add_out_argument, time_once, write_results
from ltdist.data.formats.longtail import counts_with_total
from ltdist.methods.mpfa import (
    AugmentationPlan,
    build_bank,
    draw_features,
    empirical_centres,
    generation_counts,
    select_neighbours,
)
from ltdist.methods.mpfa_retrain import (
    RetrainClassifier,
    RetrainSettings,
    item_features,
    make_optimizer,
    train_step,
)

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


def class_terms(plan: AugmentationPlan, sources: torch.Tensor) -> dict[int, int]:
    """Draws per class term of a one-draw-per-source call: {class: rows of its GEMM} (classes with > 1 row)."""
    counts = plan.offsets[1:] - plan.offsets[:-1]
    terms = torch.cat([plan.labels[sources][:, None], plan.neighbours[sources]], dim=1)
    coef = torch.cat([torch.ones(sources.numel(), 1), plan.weights[sources]], dim=1)
    used = terms[(counts[terms] > 1) & (coef > 0)]
    classes, rows = torch.unique(used, return_counts=True)
    return dict(zip(classes.tolist(), rows.tolist()))


def matmul_reference(plan: AugmentationPlan, terms: dict[int, int]) -> dict[str, float]:
    """torch.matmul GFLOP/s on the sampler's own GEMMs (per class: [rows, N_k] normals × the class's bank
    rows) and on one large GEMM of the same FLOPs ([m, 1024] × [1024, d])."""
    bank, offsets = plan.bank, plan.offsets.tolist()
    normals = {k: torch.randn(r, offsets[k + 1] - offsets[k]) for k, r in terms.items()}
    flops = sum(2.0 * e.numel() * bank.shape[1] for e in normals.values())
    same = time_once(lambda: [torch.matmul(e, bank[offsets[k]:offsets[k + 1]]) for k, e in normals.items()])
    normals.clear()  # free the normals before the large GEMM
    n = 1024
    b = torch.randn(n, bank.shape[1])
    a = torch.randn(max(1, round(flops / (2 * n * bank.shape[1]))), n)
    torch.matmul(a[:8], b)  # warm-up
    large = time_once(lambda: torch.matmul(a, b))
    return {"same_shapes": flops / same / 1e9, "large_gemm": 2 * a.shape[0] * n * bank.shape[1] / large / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_out_argument(parser, "mpfa")
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--total", type=int, default=437_513)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--neighbours", type=int, default=3)
    parser.add_argument("--neighbour-rows", type=int, default=8192, help="rows searched (0: all)")
    parser.add_argument("--window", type=int, default=65536,
                        help="method.mpfa.draw_window: generated features drawn in one sampler call")
    parser.add_argument("--steps", type=int, default=4, help="retrain classifier steps timed")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="method.mpfa.precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"threads": torch.get_num_threads()}
    result["rss_start_gib"] = rss_gib()[0]

    counts = torch.tensor(counts_with_total(args.classes, args.total, 1000, 2))
    raw, labels = synthetic_features(counts, args.dim, args.seed)
    result["bank_gib"] = raw.numel() * 4 / GIB
    result["rss_after_features_gib"] = rss_gib()[0]

    def bank_and_centres() -> None:
        nonlocal raw, bank, offsets, centres
        bank, offsets = build_bank(raw, labels, args.classes, 0.5, in_place=True)  # the stage builds it in place too
        del raw
        centres = empirical_centres(bank, offsets)

    bank = offsets = centres = neighbours = weights = None
    result["bank_and_centres_s"] = time_once(bank_and_centres)
    per_source = generation_counts(counts, "balanced")
    bank_labels = torch.repeat_interleave(torch.arange(args.classes), counts)
    gen = torch.Generator().manual_seed(args.seed)
    generating = per_source > 0
    if args.neighbour_rows:
        searched = generating.nonzero().flatten()
        searched = searched[torch.randperm(searched.numel(), generator=gen)[:args.neighbour_rows]]
        generating = torch.zeros_like(generating).index_fill_(0, searched, True)

    def search() -> None:
        nonlocal neighbours, weights
        neighbours, weights = select_neighbours(bank, bank_labels, centres, counts, generating, args.neighbours, False)

    search_s = time_once(search)
    all_generating = int((per_source > 0).sum())
    result["neighbour_search"] = {"rows": int(generating.sum()), "seconds": search_s,
                                  "extrapolated_all_rows_s": search_s * all_generating / int(generating.sum())}
    plan = AugmentationPlan(bank=bank, offsets=offsets, labels=bank_labels, centres=centres, neighbours=neighbours,
                            weights=weights, per_source=per_source, cumulative=torch.cumsum(per_source, 0))
    result["generated_per_epoch"] = plan.generated
    result["items_per_epoch"] = plan.size
    result["rss_after_plan_gib"], result["peak_rss_after_plan_gib"] = rss_gib()
    result["setup_peak_over_bank"] = result["peak_rss_after_plan_gib"] / result["bank_gib"]

    # one draw window: generated features of the searched rows, in proportion to what they generate, one
    # sampler call (the call groups them by class); a warm-up call first
    sources = torch.multinomial((per_source * generating).double(), args.window, replacement=True, generator=gen)
    draw = lambda s: draw_features(plan, s, alpha=0.4, beta=0.05, beta_form="identity", seed=1,
                                   streams=torch.arange(s.numel()), precision=args.precision)
    draw(sources[:256])
    gen_s = time_once(lambda: draw(sources))
    terms = class_terms(plan, sources)
    flops = sum(2.0 * r * int(offsets[k + 1] - offsets[k]) * args.dim for k, r in terms.items())
    reference = matmul_reference(plan, terms)
    sampler_gflops = flops / gen_s / 1e9
    rows_per_term = sorted(terms.values())
    result["sampler"] = {"draws": args.window, "seconds": gen_s, "features_per_s": args.window / gen_s,
                         "gflop": flops / 1e9, "gflop_per_s": sampler_gflops, "precision": args.precision,
                         "matmul_gflop_per_s": reference,
                         "fraction_of_matmul_same_shapes": sampler_gflops / reference["same_shapes"],
                         "fraction_of_large_gemm": sampler_gflops / reference["large_gemm"],
                         "class_terms": len(terms),
                         "gemm_rows_median": rows_per_term[len(rows_per_term) // 2]}

    # retrain steps: a global batch of real rows and generated features of the drawn sources, in the epoch's
    # proportion; the window's sampling time is the call above, its data movement the bank gathers
    settings = RetrainSettings(classifier="cosine", scale=16.0, epochs=1, batch_size=args.batch_size, lr=0.05,
                               momentum=0.9, weight_decay=5e-4, alpha=0.4, beta=0.05, beta_form="identity",
                               tukey=0.5, seed=args.seed, draw_window=args.window, precision=args.precision)
    model = RetrainClassifier(args.classes, args.dim, settings)
    optimizer = make_optimizer(model, settings)
    real_share = plan.num_real / plan.size
    num_real = round(args.batch_size * real_share)
    generated = plan.num_real + plan.cumulative[sources[:args.batch_size - num_real]] - 1
    items = torch.cat([generated, torch.randint(plan.num_real, (num_real,), generator=gen)])
    features, labels_b = item_features(plan, items, settings, 0)
    train_step(model, optimizer, features[:64], labels_b[:64], 64, 1)  # warm-up (lazy imports)
    step_s = time_once(lambda: [train_step(model, optimizer, features, labels_b, args.batch_size, 1)
                            for _ in range(args.steps)]) / args.steps
    window_rows = torch.randint(plan.num_real, (args.window,), generator=gen)
    move_s = time_once(lambda: (plan.bank[window_rows], plan.source_of(torch.randint(plan.generated, (args.window,)))))
    steps = plan.size / args.batch_size
    split = {"sampling_s": plan.generated / args.window * gen_s, "classifier_s": steps * step_s,
             "data_movement_s": plan.size / args.window * move_s}
    epoch_s = sum(split.values())
    result["retrain"] = {"steps_timed": args.steps, "step_s": step_s, "window_sampling_s": gen_s,
                         "window_data_movement_s": move_s, "epoch_split_s": split,
                         "epoch_hours_estimate": epoch_s / 3600, "items_per_s": plan.size / epoch_s,
                         "share": {k: v / epoch_s for k, v in split.items()}}
    result["rss_end_gib"], result["peak_rss_gib"] = rss_gib()
    result["peak_over_bank"] = result["peak_rss_gib"] / result["bank_gib"]
    result["avoided"] = {"dense_class_covariances_gib": args.classes * args.dim**2 * 4 / GIB,
                         "materialised_generated_gib": plan.generated * args.dim * 4 / GIB}
    table = json.dumps(result, indent=2)  # the figures are the report: printed as they are written
    print(table)
    print(f"wrote {write_results(args.out, 'mpfa', args, table, **result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
