"""MPFA maths: generated features against eq. 10 computed densely, neighbours, counts, shares, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ltdist.kernels.calibrated_sampler import calibrated_moments

from ltdist.extension import extension_available
from ltdist.methods.mpfa import (
    build_bank,
    draw_features,
    empirical_centres,
    generation_counts,
    meta_centres,
    plan_augmentation,
)
from ltdist.methods.mpfa_retrain import (
    RetrainSettings,
    epoch_order,
    item_features,
    mix_seed,
    window_shares,
)

pytestmark = pytest.mark.skipif(not extension_available(), reason="ltdist._C is not built")


def long_tail(counts: list[int], d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative (post-ReLU-like) features, labels sorted by class: [N, d], [N]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    means = 1.5 * torch.rand(len(counts), d, generator=g)
    feats = (means[labels] + torch.randn(labels.numel(), d, generator=g) * torch.linspace(1.0, 0.2, d)).relu()
    return feats, labels


def settings(**kw) -> RetrainSettings:
    base = dict(classifier="cosine", scale=16.0, epochs=1, batch_size=200, lr=0.05, momentum=0.9,
                weight_decay=5e-4, alpha=0.4, beta=0.05, beta_form="identity", tukey=0.5, seed=3)
    return RetrainSettings(**{**base, **kw})


@pytest.mark.parametrize(("literal_inv_m", "beta_form", "per_call"),
                         [(False, "identity", 1), (True, "identity", 8), (False, "all_entries", 8)])
def test_generated_moments_match_eq10_computed_densely(literal_inv_m, beta_form, per_call):
    counts, d, alpha, beta, m, tukey = [40, 30, 25, 6, 2], 8, 0.4, 0.004, 2, 0.5
    feats, labels = long_tail(counts, d)
    bank, offsets = build_bank(feats, labels, len(counts), tukey)
    # the space, written out: Tukey power on the non-negative features, then L2 normalisation
    space = F.normalize(feats.pow(tukey), dim=1)
    torch.testing.assert_close(bank, space)
    centres = F.normalize(torch.stack([space[labels == c].mean(0) for c in range(len(counts))]), dim=1)
    torch.testing.assert_close(empirical_centres(bank, offsets), centres)
    plan = plan_augmentation(bank, offsets, centres, num_neighbours=m, literal_inv_m=literal_inv_m,
                             count="balanced")

    source = int(offsets[3]) + 1  # a feature of the class with 6 samples
    sim = {j: float(F.cosine_similarity(space[source], centres[j], dim=0)) for j in range(3)}  # N_j > 6
    top = sorted(sim, key=sim.get, reverse=True)[:m]
    w = torch.softmax(torch.tensor([sim[j] for j in top]), dim=0)
    if literal_inv_m:
        w = w / m
    mu, cov = calibrated_moments(bank, offsets, centres, space[source], 3, torch.tensor(top), w, alpha, beta)
    if beta_form == "all_entries":
        cov = cov + beta * (torch.ones(d, d, dtype=torch.float64) - torch.eye(d, dtype=torch.float64))

    draws = 120_000
    x = draw_features(plan, torch.full((draws // per_call,), source), alpha=alpha, beta=beta, beta_form=beta_form,
                      seed=17, draws=per_call).reshape(draws, d).double()
    emp_cov = torch.cov(x.T)
    rel = torch.linalg.norm(emp_cov - cov) / torch.linalg.norm(cov)
    assert rel <= 0.02, f"covariance relative Frobenius error {rel:.4f}"
    z = (x.mean(0) - mu) / (cov.diagonal() / draws).sqrt()
    assert z.abs().max() < 5.0, f"mean off by {z.abs().max():.2f} standard errors"
    assert torch.linalg.norm(x.mean(0) - mu) / torch.linalg.norm(mu) <= 0.02
    # the scatter terms matter: without them (β only) the covariance would be far off
    assert torch.linalg.norm(cov - beta * torch.eye(d, dtype=torch.float64)) / torch.linalg.norm(cov) > 0.5


def test_neighbours_are_only_classes_with_more_samples():
    counts = [50, 40, 40, 20, 10, 3, 2, 1, 0]
    feats, labels = long_tail(counts, 16, seed=1)
    bank, offsets = build_bank(feats, labels, len(counts), 0.5)
    centres = empirical_centres(bank, offsets)
    plan = plan_augmentation(bank, offsets, centres, num_neighbours=3, literal_inv_m=False, count="balanced")
    n = torch.tensor(counts)
    own = plan.labels
    generating = plan.per_source > 0
    assert not bool(generating[n[own] == 50].any())
    assert set(own[generating].tolist()) == {1, 2, 3, 4, 5, 6, 7}  # every class below N_1 with a feature
    used = plan.weights > 0
    assert bool((n[plan.neighbours][used] > n[own][:, None].expand_as(used)[used]).all())
    assert not bool((plan.neighbours[used] == own[:, None].expand_as(used)[used]).any())
    torch.testing.assert_close(plan.weights[generating].sum(1), torch.ones(int(generating.sum())))
    # class 1 (40) and class 2 (40): only class 0 has more samples — one neighbour, two empty slots
    row = int(offsets[2])
    assert plan.neighbours[row, 0] == 0 and plan.weights[row].tolist() == [1.0, 0.0, 0.0]
    # the top-M by cosine similarity, checked by brute force for a tail feature
    row = int(offsets[6])
    sims = F.normalize(bank[row], dim=0) @ centres[:6].T
    assert set(plan.neighbours[row].tolist()) == set(sims.topk(3).indices.tolist())
    literal = plan_augmentation(bank, offsets, centres, num_neighbours=3, literal_inv_m=True, count="balanced")
    torch.testing.assert_close(literal.weights[row], plan.weights[row] / 3)
    torch.testing.assert_close(literal.weights[int(offsets[2])], torch.tensor([1.0, 0.0, 0.0]))
    # count=paper: the largest class generates too, calibrated towards its own centre only (weight 1)
    paper = plan_augmentation(bank, offsets, centres, num_neighbours=3, literal_inv_m=True, count="paper")
    top = slice(int(offsets[0]), int(offsets[1]))
    assert bool((paper.per_source[top] == 1).all())
    assert bool((paper.neighbours[top, 0] == 0).all()) and paper.weights[top].tolist() == [[1.0, 0.0, 0.0]] * 50
    drawn = draw_features(paper, torch.arange(3), alpha=0.2, beta=0.05, beta_form="identity", seed=0)
    assert bool(torch.isfinite(drawn).all())


def test_totals_are_balanced_or_follow_the_paper_formula():
    counts = torch.tensor([100, 37, 9, 3, 2, 1, 0, 100])
    per_source = generation_counts(counts, "balanced")
    labels = torch.repeat_interleave(torch.arange(8), counts)
    totals = counts + torch.zeros(8, dtype=torch.long).index_add_(0, labels, per_source)
    assert totals.tolist() == [100] * 6 + [0, 100]
    for c in range(8):  # spread evenly over the real features
        mine = per_source[labels == c]
        assert mine.numel() == 0 or int(mine.max() - mine.min()) <= 1
    paper = generation_counts(counts, "paper")
    expected = [1, 2, 11, 33, 49, 99]  # max(⌈100/N_k − 1⌉, 1): the largest class too makes 1 per feature
    for c, s in enumerate(expected):
        assert set(paper[labels == c].tolist()) == {s}
    assert set(paper[labels == 7].tolist()) == {1}
    assert generation_counts(torch.tensor([4, 3]), "paper").tolist() == [1] * 4 + [1] * 3  # ⌈1/3⌉ = 1
    with pytest.raises(ValueError, match="count"):
        generation_counts(counts, "more")


def test_plan_maps_every_generated_feature_to_its_source():
    feats, labels = long_tail([20, 7, 3], 4)
    bank, offsets = build_bank(feats, labels, 3, 1.0)
    plan = plan_augmentation(bank, offsets, empirical_centres(bank, offsets), num_neighbours=2,
                             literal_inv_m=False, count="balanced")
    assert plan.generated == 13 + 17 and plan.class_totals().tolist() == [20, 20, 20]
    sources = plan.source_of(torch.arange(plan.generated))
    assert torch.bincount(sources, minlength=plan.num_real).tolist() == plan.per_source.tolist()


def test_epoch_order_is_a_seeded_permutation_of_real_and_generated_items():
    feats, labels = long_tail([40, 9, 3, 1], 4)
    bank, offsets = build_bank(feats, labels, 4, 1.0)
    plan = plan_augmentation(bank, offsets, empirical_centres(bank, offsets), num_neighbours=2,
                             literal_inv_m=False, count="balanced")
    order = epoch_order(plan, 5, 2)
    assert torch.equal(order, torch.randperm(plan.size, generator=torch.Generator().manual_seed(mix_seed(5, 2, 1))))
    assert torch.equal(order.sort().values, torch.arange(plan.size))
    assert not torch.equal(order, epoch_order(plan, 5, 3))


def test_the_same_features_on_one_and_two_ranks_and_any_window():
    feats, labels = long_tail([60, 20, 5, 2], 8)
    bank, offsets = build_bank(feats, labels, 4, 0.5)
    plan = plan_augmentation(bank, offsets, empirical_centres(bank, offsets), num_neighbours=2,
                             literal_inv_m=False, count="balanced")
    s = settings(batch_size=100)
    order = epoch_order(plan, s.seed, 0)
    batches = range(0, 3)  # 240 items: batches of 100, 100 and 40 items (2, 2 and 1 blocks)
    assert plan.size == 240

    def window(rank: int, world: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        shares = window_shares(batches, s.batch_size, plan.size, rank, world)
        positions = torch.cat(shares)
        return positions, item_features(plan, order[positions], s, epoch)[0]

    pos_one, one = window(0, 1)
    assert torch.equal(pos_one, torch.arange(240))
    (pos_a, a), (pos_b, b) = window(0, 2), window(1, 2)
    assert set(pos_a.tolist()).isdisjoint(pos_b.tolist()) and sorted([*pos_a.tolist(), *pos_b.tolist()]) == \
        list(range(240))
    two = torch.empty_like(one)
    two[pos_a], two[pos_b] = a, b
    # each rank's call holds other draws, so a class's GEMM has other rows: equal up to the GEMM's rounding
    torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(window(0, 1)[1], one, atol=0, rtol=0)  # a rerun: identical
    single = torch.cat([item_features(plan, order[b * 100:(b + 1) * 100], s, 0)[0] for b in batches])
    torch.testing.assert_close(single, one, atol=1e-6, rtol=1e-5)  # one call per batch instead of one per window
    items = order
    generated = items >= plan.num_real
    assert bool(generated.any()) and bool((~generated).any())
    torch.testing.assert_close(one[~generated], plan.bank[items[~generated]])
    other = window(0, 1, epoch=1)[1]  # another epoch: new draws
    assert not torch.allclose(other[generated], one[generated])


def test_tiny_classes_negative_features_and_bad_meta_prototypes():
    feats, labels = long_tail([30, 2, 1], 6)
    feats[::3] -= 0.7  # negative entries: the signed power keeps them finite
    bank, offsets = build_bank(feats, labels, 3, 0.5)
    assert torch.isfinite(bank).all()
    plan = plan_augmentation(bank, offsets, empirical_centres(bank, offsets), num_neighbours=3,
                             literal_inv_m=False, count="balanced")
    assert plan.class_totals().tolist() == [30, 30, 30]
    x = draw_features(plan, plan.source_of(torch.arange(plan.generated)), alpha=0.4, beta=0.0,
                      beta_form="identity", seed=0)[:, 0]
    assert torch.isfinite(x).all() and x.shape == (57, 6)
    # the 1-feature class with β = 0 has the neighbours' scatter only: its draws still differ
    single = plan.source_of(torch.tensor([plan.generated - 1]))
    assert int(plan.labels[single]) == 2
    y = draw_features(plan, single.repeat(2), alpha=0.4, beta=0.0, beta_form="identity", seed=0)[:, 0]
    assert not torch.equal(y[0], y[1])
    meta = F.normalize(torch.rand(3, 6), dim=1)
    torch.testing.assert_close(meta_centres(meta, 3, 6, 1.0), meta)
    meta[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"meta-prototypes of classes \[1\] contain NaN"):
        meta_centres(meta, 3, 6, 0.5)
    with pytest.raises(ValueError, match=r"expected \[3, 5\]"):
        meta_centres(meta, 3, 5, 0.5)
