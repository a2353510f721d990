"""KT classifiers (paper 1, eqs. 3–9) against a direct small-matrix computation written out here."""

import math

import pytest
import torch

from ltdist.data.classes import excluded_classes
from ltdist.methods.kt import (
    build_kt_classifiers,
    class_prototypes,
    cosine_probabilities,
    ensemble_probabilities,
)


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _direct_kt(prototypes, weights, counts, k, tau, continual):
    """Eqs. 4–7 / 9 element by element, in plain Python floats."""
    p_hat = [_unit(p) for p in prototypes.tolist()]
    w_hat = [_unit(w) for w in weights.tolist()]
    allowed = [j for j, n in enumerate(counts.tolist()) if n > k]
    out = []
    for i, p in enumerate(p_hat):
        scores = {j: tau * sum(a * b for a, b in zip(p, w_hat[j])) for j in allowed}
        top = max(scores.values())
        z = sum(math.exp(s - top) for s in scores.values())
        w_kt = [sum(math.exp(scores[j] - top) / z * w_hat[j][d] for j in allowed) for d in range(len(p))]
        w_kt = _unit(w_kt)
        own = [0.0] * len(p) if continual or counts[i] == 0 else w_hat[i]
        out.append([w_kt[d] + p[d] + own[d] for d in range(len(p))])
    return torch.tensor(out)


@pytest.fixture
def toy():
    gen = torch.Generator().manual_seed(3)
    prototypes = torch.randn(6, 4, generator=gen)
    weights = torch.randn(6, 4, generator=gen) * 3  # norms other than 1 must not matter
    counts = torch.tensor([500, 120, 60, 20, 5, 0])  # class 5 never trained (continual)
    return prototypes, weights, counts


def test_prototypes_are_normalised_mean_of_normalised_features():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(30, 5, generator=gen) * torch.rand(30, 1, generator=gen) * 10
    labels = torch.arange(30) % 3
    protos = class_prototypes(features, labels, num_classes=4)
    for c in range(3):
        members = features[labels == c]
        mean = (members / members.norm(dim=1, keepdim=True)).mean(dim=0)
        torch.testing.assert_close(protos[c], mean / mean.norm())
    assert torch.equal(protos[3], torch.zeros(5))  # no sample: zero row, refused later by KT
    with pytest.raises(ValueError, match="labels must lie"):
        class_prototypes(features, labels + 5, num_classes=4)


@pytest.mark.parametrize("tau", [1.0, 10.0])
def test_kt_classifiers_match_direct_computation(toy, tau):
    prototypes, weights, counts = toy
    ks = [0, 20, 100]
    w_h, w_hc = build_kt_classifiers(prototypes, weights, counts, ks, tau)
    assert w_h.shape == w_hc.shape == (3, 6, 4)
    for i, k in enumerate(ks):
        torch.testing.assert_close(w_h[i], _direct_kt(prototypes, weights, counts, k, tau, continual=False))
        torch.testing.assert_close(w_hc[i], _direct_kt(prototypes, weights, counts, k, tau, continual=True))


def test_mask_by_k_ignores_classes_at_or_below_k(toy):
    prototypes, weights, counts = toy
    w_h, w_hc = build_kt_classifiers(prototypes, weights, counts, [20], 10.0)
    changed = weights.clone()
    changed[3:] = torch.randn(3, 4)  # n = 20, 5, 0: none has n > 20, so none may be attended to
    w_h2, w_hc2 = build_kt_classifiers(prototypes, changed, counts, [20], 10.0)
    torch.testing.assert_close(w_hc2, w_hc)  # w_hc holds no own weight: entirely unchanged
    torch.testing.assert_close(w_h2[:, :3], w_h[:, :3])
    # and a class above k does change it
    changed[0] = torch.randn(4)
    w_h3, _ = build_kt_classifiers(prototypes, changed, counts, [20], 10.0)
    assert not torch.allclose(w_h3[:, 1:3], w_h[:, 1:3])


def test_untrained_classes_get_prototype_only_classifiers(toy):
    prototypes, weights, counts = toy
    w_h, w_hc = build_kt_classifiers(prototypes, weights, counts, [0, 20], 10.0)
    torch.testing.assert_close(w_h[:, 5], w_hc[:, 5])  # n = 0: no learned weight enters
    changed = weights.clone()
    changed[5] = torch.randn(4)  # its (untrained) weight row affects nothing, even at k = 0
    torch.testing.assert_close(build_kt_classifiers(prototypes, changed, counts, [0, 20], 10.0)[0], w_h)


def test_k_above_every_count_and_missing_prototype_are_clear_errors(toy):
    prototypes, weights, counts = toy
    with pytest.raises(ValueError, match="k=500"):
        build_kt_classifiers(prototypes, weights, counts, [0, 500], 10.0)
    prototypes = prototypes.clone()
    prototypes[2] = 0
    with pytest.raises(ValueError, match=r"classes \[2\] have no prototype"):
        build_kt_classifiers(prototypes, weights, counts, [0], 10.0)


def test_ensemble_is_mean_of_softmax_and_sums_to_one(toy):
    prototypes, weights, counts = toy
    w_h, _ = build_kt_classifiers(prototypes, weights, counts, [0, 20, 100], 10.0)
    features = torch.randn(16, 4)
    probs = ensemble_probabilities(features, list(w_h), scale=16.0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(16))
    f_hat = features / features.norm(dim=1, keepdim=True)
    direct = sum(torch.softmax(16.0 * f_hat @ (v / v.norm(dim=1, keepdim=True)).T, dim=1) for v in w_h) / 3
    torch.testing.assert_close(probs, direct)
    torch.testing.assert_close(cosine_probabilities(features, w_h[0], 16.0), torch.softmax(
        16.0 * f_hat @ (w_h[0] / w_h[0].norm(dim=1, keepdim=True)).T, dim=1))
    with pytest.raises(ValueError, match="no classifier"):
        ensemble_probabilities(features, [], 16.0)


def test_excluded_classes():
    counts = [6000, 100, 20, 19, 6]
    assert excluded_classes(None, counts, 20) == []
    assert excluded_classes("few", counts, 20) == [3, 4]
    assert excluded_classes([4, 1, 4], counts, 20) == [1, 4]
    with pytest.raises(ValueError, match=r"class ids \[9\]"):
        excluded_classes([9], counts, 20)
    with pytest.raises(ValueError, match="exclude_from_training"):
        excluded_classes("rare", counts, 20)
