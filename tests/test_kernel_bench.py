"""The kernel benchmark runs end to end and writes its CSV/JSON/PNG (tiny settings; no timing asserted)."""

from __future__ import annotations

import csv
import json

from ltdist.kernels import bench


def test_bench_writes_results(tmp_path):
    rc = bench.main(["--quick", "--ops", "prototype_ema", "--no-compile", "--budget", "0.01", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["results"]
    assert {r["impl"] for r in rows} == {"eager"}  # no Triton fast path on CPU
    assert all(r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)
    assert data["meta"]["sampler_memory"]["per_class_covariances_gb"] > 30 * data["meta"]["sampler_memory"]["bank_gb"]
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"op", "shape", "impl", "median_ms", "p20_ms", "p80_ms"} <= set(table[0])
    assert (tmp_path / "times.png").stat().st_size > 0
