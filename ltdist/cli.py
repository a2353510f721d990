"""The ``ltdist`` console script: one subcommand per tool, each delegating to its module's ``main``."""

from __future__ import annotations

import importlib
import sys

# subcommand -> module whose main(argv) -> int implements it
COMMANDS = {
    "launch": "ltdist.launch",
    "shards": "ltdist.data.shards",
    "stats": "ltdist.data.stats",
    "compare": "ltdist.evaluate.compare",
    "sweep": "ltdist.sweep",
}
BENCHMARKS = {
    "kernels": "ltdist.bench.kernels",
    "engine": "ltdist.bench.engine",
    "objectives": "ltdist.bench.objectives",
    "engine-dist": "ltdist.bench.engine_dist",
    "data": "ltdist.bench.data",
    "mpfa": "ltdist.bench.mpfa",
    "scale": "ltdist.bench.scale",
}

USAGE = """usage: ltdist COMMAND [args...]

commands:
  launch         submit a job (local or Slurm): ltdist launch --cluster slurm [key=value ...]
  shards         write webdataset shards + index.json from a raw dataset
  stats          what the rebalancing stream will emit, per class, per rank
  compare        one table (mean ± std over seeds) of every method across run dirs: ltdist compare RUN_DIR...
  sweep          run presets × seeds (local or a Slurm job array), then compare: ltdist sweep --seeds 3
  bench kernels  kernel microbenchmarks (Triton / C++ / CUDA vs PyTorch)
  bench engine   DeepSpeed step time vs a plain PyTorch loop
  bench objectives  a stage-1 objective's step (MPCL with/without meta step) vs a cross-entropy step
  bench engine-dist  2 ranks: DeepSpeed ZeRO 0/1/2 vs DistributedDataParallel
  bench data     training-stream throughput vs a map-style DataLoader
  bench mpfa     MPFA stage memory and generation throughput on an iNaturalist-shaped bank
  bench scale    every stage at 1 000 and 8 142 classes (synthetic iNaturalist-shaped data): time and memory

'ltdist COMMAND --help' describes each command; every benchmark writes --out DIR/results.json and DIR/table.txt
(default DIR: runs/bench/NAME)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            print(f"usage: ltdist bench {{{','.join(BENCHMARKS)}}} [args...]", file=sys.stderr)
            return 2
        module, rest = BENCHMARKS[rest[0]], rest[1:]
    elif command in COMMANDS:
        module = COMMANDS[command]
    else:
        print(f"ltdist: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(importlib.import_module(module).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
