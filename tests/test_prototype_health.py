"""Prototype health: cosines to the class means, ‖ĉ − c‖, updates and nearest-prototype top-1, per class and group."""

import math

import pytest
import torch
import torch.nn.functional as F

from ltdist.evaluate.prototype_health import health_markdown, prototype_health


def _problem():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=gen), dim=1)
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 2)
    features = 3.0 * (centres[labels] + 0.1 * torch.randn(12, 8, generator=gen))  # scale does not matter
    mean = F.normalize(torch.stack([F.normalize(features[labels == k], dim=1).mean(0) for k in range(3)]), dim=1)
    return centres, features, labels, mean


def test_health_equals_its_definitions():
    centres, features, labels, mean = _problem()
    stale = mean.clone()
    stale[2] = F.normalize(features[labels == 2][0] + torch.randn(8, generator=torch.Generator().manual_seed(4)),
                           dim=0)  # a tail prototype that points away from its class
    meta = 2.0 * mean  # meta-prototypes along the class means (any scale)
    test = {"features": torch.cat([centres, centres]), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    groups = {"many": [0], "medium": [1], "few": [2]}
    health = prototype_health(stale, meta, torch.tensor([60, 40, 20]), features, labels, test, groups, rows_max=10)
    rows = health["classes"]
    assert [r["train_count"] for r in rows] == [6, 4, 2] and [r["updates"] for r in rows] == [60, 40, 20]
    assert rows[0]["cos_prototype_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows[2]["cos_prototype_mean"] == pytest.approx(float(stale[2] @ mean[2]), abs=1e-6)
    assert all(r["cos_meta_mean"] == pytest.approx(1.0, abs=1e-6) for r in rows)
    assert rows[2]["meta_shift"] == pytest.approx(float((mean[2] - stale[2]).norm()), abs=1e-6)
    assert rows[0]["meta_shift"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["nearest_meta_top1"] == 1.0 for r in rows)  # the centres themselves, nearest to the means
    few = health["groups"]["few"]
    assert few["cos_prototype_mean"] == pytest.approx(rows[2]["cos_prototype_mean"])
    assert health["groups"]["all"]["updates"] == pytest.approx(40.0)
    md = "\n".join(health_markdown(health))
    assert "## Prototype health (MPCL)" in md and "| class 2 (n = 2) |" in md and "| few |" in md
    # no meta-network: those columns are N/A; past rows_max only the groups are kept
    plain = prototype_health(stale, None, None, features, labels, test, groups, rows_max=2)
    assert "classes" not in plain and plain["groups"]["few"]["cos_meta_mean"] is None
    assert plain["groups"]["few"]["updates"] is None
    assert math.isclose(plain["groups"]["many"]["cos_prototype_mean"], 1.0, abs_tol=1e-6)
