"""Paired-over-seeds intervals: a known difference is found, no difference is a tie, coverage is 95 %."""

import json
import random

import pytest
from scipy import stats
from test_compare import _run

from ltdist.evaluate.compare import main
from ltdist.evaluate.paired import paired_difference, t975


def test_t_quantiles_match_scipy():
    for df in range(1, 31):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)
    assert t975(200) == pytest.approx(stats.norm.ppf(0.975), abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_known_difference_is_detected_and_none_is_a_tie():
    base = {0: 0.80, 1: 0.84, 2: 0.78}
    better = {s: v + 0.03 + 0.002 * (-1) ** s for s, v in base.items()}  # seed noise of base, shared: removed
    found = paired_difference(better, base, a_name="A", b_name="B", column="all")
    assert found.verdict == ">" and found.low > 0 and found.mean == pytest.approx(0.03 + 0.002 / 3)
    assert found.sentence().startswith("A > B (all): A − B = +3.1 points, 95 % CI [")
    assert paired_difference(base, better, a_name="B", b_name="A", column="all").verdict == "<"
    same = {s: v + 0.01 * (-1) ** s for s, v in base.items()}
    tie = paired_difference(same, base, a_name="A", b_name="B", column="few")
    assert tie.verdict == "tie" and tie.low < 0 < tie.high and "A ties B (few)" in tie.sentence()
    one = paired_difference({0: 0.9, 5: 0.1}, {0: 0.5}, a_name="A", b_name="B", column="all")
    assert one.verdict == "n/a" and one.seeds == (0,) and one.low is None
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({1: 0.5}, {2: 0.5}, a_name="A", b_name="B", column="all")


def test_interval_covers_the_true_difference_95_percent_of_the_time():
    rng = random.Random(0)
    trials, covered = 4000, 0
    for _ in range(trials):
        noise = [rng.gauss(0, 0.02) for _ in range(3)]  # shared by both methods: pairing removes it
        a = {s: 0.7 + noise[s] + 0.01 + rng.gauss(0, 0.005) for s in range(3)}
        b = {s: 0.7 + noise[s] + rng.gauss(0, 0.005) for s in range(3)}
        d = paired_difference(a, b, a_name="A", b_name="B", column="all")
        covered += d.low <= 0.01 <= d.high
    assert 0.94 <= covered / trials <= 0.96  # binomial sd at 4000 trials: 0.0034


def test_compare_writes_matrix_best_and_claims(tmp_path, capsys):
    for seed, shift in enumerate([0.0, 0.04, -0.03]):
        rows = {"linear": (0.80 + shift, 0.10 + shift), "cRT": (0.80 + shift, 0.30 + shift),
                "NCM": (0.80 + shift, 0.31 + shift + 0.02 * (-1) ** seed)}
        _run(tmp_path / "runs", "lin", seed, rows, loss="ce", head="linear")
        _run(tmp_path / "runs", "cos", seed, {"cosine": (0.85 + shift, 0.2 + shift)}, loss="ce", head="cosine")
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--claim", "ce (linear head)=cRT > ce (linear head)=linear",
                 "--claim", "ce (linear head)=NCM > ce (linear head)=cRT"]) == 0
    found = json.loads((out / "comparison.json").read_text())["conclusions"]
    verdicts = {(c["a"], c["b"], c["column"]): c["verdict"] for c in found["claims"]}
    assert verdicts == {("ce (linear head)=cRT", "ce (linear head)=linear", "all"): ">",
                        ("ce (linear head)=cRT", "ce (linear head)=linear", "few"): ">",
                        ("ce (linear head)=NCM", "ce (linear head)=cRT", "all"): "tie",
                        ("ce (linear head)=NCM", "ce (linear head)=cRT", "few"): "tie"}
    assert found["best_per_backbone"]["ce (linear head)"]["best"] == "ce (linear head)=NCM"
    assert found["best_overall"]["best"] == "ce (linear head)=NCM"
    md = (out / "comparison.md").read_text()
    assert "| All | ce (cosine head) | ce (linear head) |" in md and "| cosine | 52.8 ± 3.5 | — |" in md
    assert "- ce (linear head)=NCM ties ce (linear head)=cRT (few)" in md
    assert "tied with ce (linear head)=cRT" in found["text"]
    assert main([str(tmp_path / "runs"), "--out", str(out), "--claim", "ce (linear head)=kt > x=y"]) == 2
    assert "no runs report 'ce (linear head)=kt'" in capsys.readouterr().err
