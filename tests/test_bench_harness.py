"""The benchmark harness's arithmetic, and every benchmark end to end in its quick mode: each writes
``--out DIR/results.json`` (``benchmark``, ``args`` and its own fields) and ``DIR/table.txt``."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from ltdist.bench import harness
from ltdist.bench.harness import summarise, timed_rounds
from ltdist.cli import BENCHMARKS
from ltdist.cli import main as cli_main
from ltdist.data.index import read_index


def test_rounds_rotate_and_ratios_are_paired_per_round():
    order: list[str] = []
    loops = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = timed_rounds(loops, steps=3, warmup=1)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(len(t["wall"]) == 3 and len(t["cpu"]) == 3 for t in times.values())
    synthetic = {"plain": {"wall": [1.0, 2.0, 4.0], "cpu": [1.0, 1.0, 1.0]},
                 "ds": {"wall": [1.5, 2.2, 4.8], "cpu": [1.1, 1.3, 1.2]}}
    s = summarise(synthetic, "plain")
    assert s["ds"]["paired_wall"] == pytest.approx(1.2) and s["ds"]["paired_cpu"] == pytest.approx(1.2)
    assert s["ds"]["wall_s"] == 2.2 and s["plain"]["paired_wall"] == 1.0
    # the spread: p20 and p80, linear between order statistics
    assert s["ds"]["wall_p20_s"] == pytest.approx(1.5 + 0.4 * 0.7) and s["ds"]["wall_p80_s"] == pytest.approx(
        2.2 + 0.6 * 2.6)


def test_a_budget_ends_the_rounds_and_a_slow_warmup_needs_one_round(monkeypatch):
    clock = [0.0]  # a clock that each call of the loop moves on by one second
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    tick = lambda: clock.__setitem__(0, clock[0] + 1.0)
    rounds = lambda budget, min_steps: len(timed_rounds({"x": tick}, 50, warmup=1, budget_s=budget,
                                                        min_steps=min_steps)["x"]["wall"])
    assert rounds(10.0, 3) == 10  # until the budget is spent
    assert rounds(1.5, 3) == 3  # at least min_steps
    assert rounds(0.5, 3) == 1  # the warm-up alone outlasted the budget: one round
    assert rounds(100.0, 3) == 50  # steps caps it
    assert harness.time_once(tick) == 1.0


def test_out_is_a_directory_and_a_json_file_name_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "objectives", "--out", str(tmp_path / "bench.json")])
    assert "--out is a directory: it receives results.json and table.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "data", "--json", str(tmp_path / "data.json")])
    assert "--json FILE is now --out DIR" in capsys.readouterr().err
    path = harness.write_results(tmp_path / "out", "x", {"out": tmp_path, "n": 2, "cases": ("a", "b")}, "t\n", y=1)
    assert json.loads(path.read_text()) == {"benchmark": "x", "args": {"out": str(tmp_path), "n": 2,
                                                                       "cases": ["a", "b"]}, "y": 1}
    assert (tmp_path / "out" / "table.txt").read_text() == "t\n"


def _results(out: Path, benchmark: str, keys: set[str]) -> dict:
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == benchmark and {"benchmark", "args", *keys} <= set(data)
    assert (out / "table.txt").stat().st_size > 0
    return data


def test_every_benchmark_is_tested_here():
    tested = {"kernels", "engine", "engine-dist", "objectives", "data", "mpfa", "scale"}
    assert set(BENCHMARKS) == tested


def test_kernels_bench_writes_results(tmp_path):
    """Tiny settings; no timing asserted."""
    rc = cli_main(["bench", "kernels", "--quick", "--ops", "prototype_ema", "--no-compile", "--budget", "0.01",
                   "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    data = _results(tmp_path, "kernels", {"meta", "results"})
    rows = data["results"]
    assert {r["impl"] for r in rows} == {"eager"}  # no Triton fast path on CPU
    assert all(r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)
    assert data["meta"]["sampler_memory"]["per_class_covariances_gb"] > 30 * data["meta"]["sampler_memory"]["bank_gb"]
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"op", "shape", "impl", "median_ms", "p20_ms", "p80_ms"} <= set(table[0])
    assert (tmp_path / "times.png").stat().st_size > 0


def test_engine_bench_then_objectives(env, tmp_path, capsys):
    assert cli_main(["bench", "engine", "--cases", "resnet8:8:4", "--channels", "1", "--steps", "1", "--warmup", "0",
                     "--objectives", "--out", str(tmp_path)]) == 0
    row = _results(tmp_path, "engine", {"target_ratio", "results"})["results"][0]
    assert list(row["loops"]) == ["plain", "deepspeed", "ltdist"] and row["loops"]["plain"]["paired_wall"] == 1.0
    assert len(row["times"]["plain"]["wall"]) == 1
    assert len(_results(tmp_path / "objectives", "objectives", {"results"})["results"]) == 4
    assert "paired wall" in (tmp_path / "table.txt").read_text() and "paired wall" in capsys.readouterr().out


def test_objective_benchmark_runs_every_case(tmp_path):
    assert cli_main(["bench", "objectives", "--case", "resnet8:8:4", "--steps", "1", "--warmup", "0",
                     "--out", str(tmp_path)]) == 0
    result = _results(tmp_path, "objectives", {"arch", "threads", "results"})
    ratios = {r["objective"]: r["paired_ratio_to_ce"] for r in result["results"]}
    assert ratios["ce"] == 1.0 and len(ratios) == 4 and all(v > 0 for v in ratios.values())


def test_distributed_benchmark_times_every_mode_and_a_variant_on_two_ranks(tmp_path, capsys):
    from ltdist.bench import engine_dist

    variant = 'zero2-overlap:2:{"zero_optimization": {"overlap_comm": true, "reduce_bucket_size": 100000}}'
    assert engine_dist.main(["--cases", "resnet8:8:8", "--channels", "1", "--steps", "2", "--warmup", "0",
                             "--variant", variant, "--profile", "1", "--out", str(tmp_path)]) == 0
    row = _results(tmp_path, "engine-dist", {"results"})["results"][0]
    assert list(row["modes"]) == ["ddp", "zero0", "zero1", "zero2", "zero2-overlap"]
    assert row["modes"]["ddp"]["paired_wall"] == 1.0 and all(m["wall_s"] > 0 for m in row["modes"].values())
    assert row["variants"]["zero2-overlap"]["zero_optimization"]["overlap_comm"] is True
    assert row["micro_batch"] == 4 and row["params"] > 0 and "zero2-overlap - ddp" in row["profile"]
    printed = capsys.readouterr().out
    assert "zero2-overlap" in printed and "grew most" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "table.txt"]
    with pytest.raises(SystemExit):
        engine_dist.main(["--variant", "zero1:1:{}"])  # a name the built-in modes use


def test_data_bench_quick(tmp_path):
    assert cli_main(["bench", "data", "--images", "16", "--source-size", "40", "30", "--image-size", "16",
                     "--batch-size", "8", "--workers", "0", "--repeats", "2", "--out", str(tmp_path)]) == 0
    row = _results(tmp_path, "data", {"results"})["results"][0]
    assert row["workers"] == 0 and len(row["runs"]["stream"]) == len(row["runs"]["map"]) == 2
    assert row["map_images_per_s"] > 0 and row["ratio_cpu"] == pytest.approx(
        row["stream_per_cpu_s"] / row["map_per_cpu_s"])


def test_mpfa_bench_quick(tmp_path):
    assert cli_main(["bench", "mpfa", "--classes", "20", "--total", "4000", "--dim", "16", "--neighbour-rows", "40",
                     "--window", "256", "--steps", "1", "--batch-size", "32", "--threads", "1",
                     "--out", str(tmp_path)]) == 0
    data = _results(tmp_path, "mpfa", {"sampler", "retrain", "neighbour_search", "peak_over_bank"})
    assert data["sampler"]["draws"] == 256 and data["retrain"]["step_s"] > 0 and data["args"]["classes"] == 20


def test_scale_bench_table_and_json(tmp_path, capsys):
    """``ltdist bench scale`` on its cheap stages at two small class counts: rows, ratios and the JSON."""
    out = tmp_path / "scale"
    assert cli_main(["bench", "scale", "--classes", "120", "60", "--stages", "shards", "stats", "--out", str(out),
                     "--work-dir", str(tmp_path / "work"), "--shard-workers", "1", "--batch-size", "64"]) == 0
    result = _results(out, "scale", {"classes", "runs", "table"})
    assert result["classes"] == [60, 120]
    for classes in ("60", "120"):
        shards = result["runs"][classes]["shards"]
        assert shards["wall_s"] > 0 and shards["peak_rss_gib"] > 0
        index = read_index(tmp_path / "work" / f"classes_{classes}" / "shards")
        assert shards["work"] == sum(sum(c) for c in index.counts.values())
        assert result["runs"][classes]["stats"]["stream"]["classes_never_emitted"] == 0
    row = next(line for line in result["table"].splitlines() if line.startswith("| shards |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    time_ratio, work_ratio, quotient = (float(c) for c in cells[4:7])
    assert work_ratio == pytest.approx(result["runs"]["120"]["shards"]["work"] / result["runs"]["60"]["shards"]["work"],
                                       abs=0.01)
    assert quotient == pytest.approx(time_ratio / work_ratio, abs=0.01)
    assert "| shards |" in capsys.readouterr().out


def test_scale_bench_finds_its_preset_or_names_the_flag(tmp_path, monkeypatch, capsys):
    from ltdist.bench import scale

    args = scale.parser().parse_args(["--stages", "train"])
    assert args.config is None
    monkeypatch.setattr(scale, "PRESET", Path("no") / "such.yaml")  # an installed package: no configs/ beside it
    with pytest.raises(SystemExit):
        scale.main(["--stages", "train", "--out", str(tmp_path)])
    assert "pass --config PATH" in capsys.readouterr().err
    preset = tmp_path / "preset.yaml"
    command = scale.stage_command("train", 10, tmp_path, scale.parser().parse_args(["--config", str(preset)]))
    assert command[command.index("--config") + 1] == str(preset)
