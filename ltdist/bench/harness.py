"""What every benchmark shares: one timing helper and one output convention.

Timing. :func:`timed_rounds` runs the compared loops in rounds, every loop once per round, each round
starting one loop later, so that load drift on a shared machine and the cost of running right after
another loop hit all loops alike. It records every timed round's wall and CPU seconds per loop;
:func:`summarise` gives per loop the median, the p20–p80 spread and, against a baseline loop of the same
run, the median over rounds of the loop's time / the baseline's (the paired ratio: each round's loops saw
about the same load, so this is the steadiest ratio on a shared machine). A single loop with a time
budget is the kernel benchmarks' "repeat until the budget is spent"; :func:`time_once` is one timed call.

Output. ``--out DIR`` (:func:`add_out_argument`) receives ``results.json`` — ``{"benchmark": name, "args":
the command line's arguments, ...the benchmark's own fields}`` — and ``table.txt``, what the benchmark
printed as its result (:func:`write_results`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Times = dict[str, dict[str, list[float]]]  # loop -> {"wall": seconds per timed round, "cpu": ...}


def _no_sync() -> None:
    pass


def timed_rounds(loops: dict[str, Callable[[], object]], steps: int, warmup: int = 0,
                 sync: Callable[[], object] = _no_sync, cpu_clock: Callable[[], float] = time.process_time,
                 budget_s: float | None = None, min_steps: int = 1) -> Times:
    """Run ``warmup`` untimed rounds, then up to ``steps`` timed rounds; every round runs each loop once,
    starting one loop later than the round before. ``sync`` runs before and after each timed call (a CUDA
    synchronise, a barrier); ``cpu_clock`` is the CPU seconds counter (default: this process, all threads).

    With ``budget_s``, the timed rounds stop once at least ``min_steps`` of them ran and ``budget_s``
    seconds have passed since the first; when the warm-up rounds alone took longer than ``budget_s``
    (the slow baselines), one timed round is enough. Returns per loop the timed rounds' ``wall`` and
    ``cpu`` seconds."""
    names = list(loops)
    times: Times = {n: {"wall": [], "cpu": []} for n in names}
    start = time.perf_counter()
    for i in range(warmup + steps):
        if budget_s is not None:
            if i == warmup:
                if time.perf_counter() - start > budget_s:
                    min_steps = 1
                start = time.perf_counter()
            elif i > warmup and i - warmup >= min_steps and time.perf_counter() - start >= budget_s:
                break
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync()
            wall, cpu = time.perf_counter(), cpu_clock()
            loops[name]()
            sync()
            if i >= warmup:
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(cpu_clock() - cpu)
    return times


def time_once(fn: Callable[[], object], sync: Callable[[], object] = _no_sync) -> float:
    """Wall seconds of one call of ``fn`` (one timed round of one loop)."""
    return timed_rounds({"call": fn}, steps=1, sync=sync)["call"]["wall"][0]


def quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs``, linear between the two nearest order statistics."""
    ys = sorted(xs)
    pos = q * (len(ys) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def summarise(times: Times, baseline: str) -> dict[str, dict[str, float]]:
    """Per loop: median wall / CPU seconds (``wall_s``, ``cpu_s``), their p20 and p80 (``wall_p20_s`` ...) and,
    against ``baseline``, the median of per-round ratios (``paired_wall``, ``paired_cpu``)."""
    out = {}
    base = times[baseline]
    for name, t in times.items():
        row = {"wall_s": statistics.median(t["wall"]), "cpu_s": statistics.median(t["cpu"]),
               "paired_wall": statistics.median(a / b for a, b in zip(t["wall"], base["wall"])),
               "paired_cpu": statistics.median(a / b for a, b in zip(t["cpu"], base["cpu"]))}
        for kind in ("wall", "cpu"):
            row[f"{kind}_p20_s"], row[f"{kind}_p80_s"] = quantile(t[kind], 0.2), quantile(t[kind], 0.8)
        out[name] = row
    return out


def profile_loops(loops: dict[str, Callable[[], object]], steps: int, top: int = 10) -> dict[str, list]:
    """torch.profiler over ``steps`` steps of each loop: the ``top`` operators by self CPU time per step
    ``[name, ms, calls]``, plus ``"<loop> - <first loop>"``: the operators whose per-step time grew most."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, tuple[float, float]]] = {}
    for name, step in loops.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        per_op[name] = {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()}
    result: dict[str, list] = {}
    first = next(iter(per_op))
    for name, ops in per_op.items():
        result[name] = [[k, ms, n] for k, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]]
        if name != first:
            keys = set(ops) | set(per_op[first])
            grew = sorted(((ops.get(k, (0, 0))[0] - per_op[first].get(k, (0, 0))[0], k) for k in keys), reverse=True)
            result[f"{name} - {first}"] = [[k, ms, per_op[first].get(k, (0, 0))[1], ops.get(k, (0, 0))[1]]
                                           for ms, k in grew[:top]]
    return result


def format_profile(profile: dict[str, list]) -> list[str]:
    """The lines of :func:`profile_loops`'s result: top operators per loop, then those that grew most."""
    lines = []
    for name, entries in profile.items():
        if " - " in name:
            lines.append(f"\nprofile, {name}: operators whose self CPU time per step grew most (ms, calls before -> "
                         f"after)")
            lines += [f"  {op:<48}{ms:>+9.2f}  {before:>5.0f} -> {after:<5.0f}" for op, ms, before, after in entries]
        else:
            lines.append(f"\nprofile, {name}: top operators by self CPU time per step (ms, calls)")
            lines += [f"  {op:<48}{ms:>9.2f}  {calls:>5.0f}" for op, ms, calls in entries]
    return lines


def _out_dir(value: str) -> Path:
    if value.endswith(".json"):
        raise argparse.ArgumentTypeError(
            f"--out is a directory: it receives results.json and table.txt (got {value!r}; pass e.g. "
            f"--out {value[:-len('.json')]})")
    return Path(value)


def add_out_argument(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """``--out DIR`` (default ``runs/bench/<benchmark>``); a path ending in ``.json`` is refused with the new
    convention named."""
    parser.add_argument("--out", type=_out_dir, default=Path("runs/bench") / benchmark, metavar="DIR",
                        help="directory for results.json and table.txt (default: %(default)s)")


def _plain(value: Any) -> Any:
    """An argument value as JSON holds it (paths and other objects as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def write_results(out: Path, benchmark: str, args: argparse.Namespace | dict[str, Any], printed: str | None = None,
                  **fields: Any) -> Path:
    """Write ``out/results.json`` (``{"benchmark", "args", **fields}``) and, given ``printed`` (the table the
    benchmark printed), ``out/table.txt``; returns the JSON's path. ``args``: the parsed command line (its
    values as JSON holds them)."""
    out.mkdir(parents=True, exist_ok=True)
    arguments = vars(args) if isinstance(args, argparse.Namespace) else args
    path = out / "results.json"
    path.write_text(json.dumps({"benchmark": benchmark, "args": {k: _plain(v) for k, v in arguments.items()},
                                **fields}, indent=1) + "\n")
    if printed is not None:
        (out / "table.txt").write_text(printed.rstrip("\n") + "\n")
    return path
