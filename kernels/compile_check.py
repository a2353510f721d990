"""Ahead-of-time compile check of every Triton kernel: ``python -m ltdist.kernels.compile_check``.

No GPU needed: ``triton.compile`` targets sm_80 and sm_90 and runs the ptxas shipped with Triton. The
kernels are found in the package (every ``@triton.jit`` function, autotuned or not, of every
``ltdist.kernels`` module), so a new kernel is checked without editing this file. For each kernel ×
autotune config × dtype (fp32, bf16) × target it records registers, spills and shared memory, and fails when

- a combination does not compile;
- no config is left for a (kernel, dtype, target) after the autotune pruner (the dtype's tiles that fit
  in the target's shared memory) — i.e. autotuning could pick a config that cannot launch, or none;
- a bf16 config autotuning may pick, of a kernel with ``tl.dot``, has no tensor-core instruction (``mma``
  on sm_80, ``wgmma``/``mma`` on sm_90);
- an autotuned kernel writes a buffer it also reads and autotune does not restore it (``restore_value``).

Signatures come from the kernel's parameters: ``*_ptr`` parameters point to the checked dtype unless
annotated (``tl.pointer_type(tl.float32)``), annotated scalars keep their type, other scalars are i32;
constexprs come from the autotune config, the parameter's default, or else are booleans tried both ways
(``--quick``: only True, and only the configs autotuning may pick).
"""

import argparse
import ast
import contextlib
import importlib
import io
import itertools
import json
import os
import pkgutil
import re
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

TARGETS = (80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TENSOR_CORE = {80: ("mma.sync",), 90: ("wgmma.mma_async", "mma.sync")}
POINTER_DTYPE = {"fp32": "fp32", "bf16": "bf16"}


@dataclass
class Job:
    module: str
    kernel: str  # attribute name in the module
    config: dict[str, Any]  # autotune config (kwargs + num_warps/num_stages); {} for a plain kernel
    dtype: str  # "fp32", "bf16", or "any" when no pointer depends on the dtype
    target: int
    flags: dict[str, bool]
    candidate: bool  # the autotune pruner keeps this config for this dtype (before shared memory)
    limit: int  # shared memory per block of the target


@dataclass
class Row:
    module: str
    kernel: str
    config: str
    dtype: str
    target: str
    flags: str
    candidate: bool
    ok: bool = False
    error: str = ""
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = -1
    limit: int = 0
    fits: bool = False
    tensor_core_ops: int = 0
    uses_dot: bool = False
    seconds: float = 0.0
    pickable: bool = field(default=False)  # candidate and fits: autotuning may run it


def discover() -> list[tuple[str, str, Any]]:
    """(module, name, kernel) of every Triton kernel defined in ltdist.kernels: JITFunction or Autotuner."""
    import ltdist.kernels as pkg
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name == "compile_check":
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in sorted(vars(mod).items()):
            if isinstance(obj, (Autotuner, JITFunction)) and _jit(obj).fn.__module__ == mod.__name__:
                found.append((mod.__name__, name, obj))
    return found


def _jit(kernel: Any) -> Any:
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _address_names(node: ast.AST) -> set[str]:
    """Names an expression's value is computed from, not looking inside ``tl.load(...)``: a loaded value
    (an index) is data, the pointer it was loaded from is not part of the address."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
        return set()
    if isinstance(node, ast.Name):
        return {node.id}
    return set().union(*(_address_names(child) for child in ast.iter_child_nodes(node)))


def read_and_written(fn: Any) -> set[str]:
    """Pointer parameters (``*_ptr``) a kernel both loads from and stores to, from its source: pointer
    expressions are traced back through local assignments to the parameters they derive from."""
    tree = ast.parse(textwrap.dedent(fn.src))
    params = {p for p in fn.arg_names if p.endswith("_ptr")}
    deps: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        deps.setdefault(n.id, set()).update(_address_names(node.value))

    def roots(names: set[str]) -> set[str]:
        seen, todo = set(), list(names)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += deps.get(n, ())
        return seen & params

    loads, stores = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            op = node.func.attr
            ptr = roots(_address_names(node.args[0]))
            if op == "load" or op.startswith("atomic_"):
                loads |= ptr
            if op == "store" or op.startswith("atomic_"):
                stores |= ptr
    return loads & stores


def signature(fn: Any, dtype: str) -> tuple[dict[str, str], dict[tuple[int], list]]:
    """Triton signature of ``fn`` for pointers of ``dtype`` (see module docstring) and 16-byte alignment
    attributes for the pointers (torch allocations are aligned)."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        if p.annotation:
            sig[p.name] = p.annotation
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + POINTER_DTYPE.get(dtype, "fp32")
        else:
            sig[p.name] = "i32"
        if sig[p.name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def free_flags(fn: Any, config: dict[str, Any]) -> list[str]:
    """Constexpr parameters set neither by the config nor by a default: booleans tried both ways."""
    return [p.name for p in fn.params if p.is_constexpr and p.name not in config and not p.has_default]


def jobs(kernels: list[tuple[str, str, Any]], quick: bool) -> Iterator[Job]:
    from ltdist.kernels._autotune import SHARED_MEMORY_PER_BLOCK, TilePruner
    from triton.runtime.autotuner import Autotuner

    for module, name, kernel in kernels:
        fn = _jit(kernel)
        configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
        pruner = getattr(kernel, "early_config_prune", None)
        dtype_free = all(p.annotation or not p.name.endswith("_ptr") for p in fn.params if not p.is_constexpr)
        for dtype, target in itertools.product(["any"] if dtype_free else list(DTYPES), TARGETS):
            cands = pruner.candidates(configs, DTYPES.get(dtype, torch.float32)) \
                if isinstance(pruner, TilePruner) else configs
            for cfg in configs:
                if quick and cfg not in cands:
                    continue
                kw = cfg.all_kwargs() if cfg is not None else {}
                names = free_flags(fn, kw)
                values = [(True,) * len(names)] if quick else itertools.product((False, True), repeat=len(names))
                for v in values:
                    yield Job(module, name, kw, dtype, target, dict(zip(names, v)), cfg in cands,
                              SHARED_MEMORY_PER_BLOCK[target])


def compile_one(job: Job) -> Row:
    """Compile one combination; registers and spills come from the ptxas log of that compile."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    kernel = getattr(importlib.import_module(job.module), job.kernel)
    fn = _jit(kernel)
    cfg = dict(job.config)
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in cfg}
    constexprs = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    constexprs.update(cfg)
    constexprs.update(job.flags)
    sig, attrs = signature(fn, job.dtype)
    row = Row(job.module.rsplit(".", 1)[-1], job.kernel, _config_str(job.config), job.dtype, f"sm_{job.target}",
              ",".join(f"{k}={int(v)}" for k, v in job.flags.items()), job.candidate, limit=job.limit,
              uses_dot="tl.dot(" in fn.src)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(triton.compiler.ASTSource(fn, sig, constexprs, attrs),
                                      target=GPUTarget("cuda", job.target, 32), options=options)
    except Exception as exc:  # any compile failure is a finding, reported per combination
        row.error = f"{type(exc).__name__}: {str(exc).strip()[:600]}"
        return row
    row.seconds = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    row.ok = True
    row.registers = int(m.group(1)) if (m := re.search(r"Used (\d+) registers", text)) else -1
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text):
        row.spill_stores, row.spill_loads = int(m.group(1)), int(m.group(2))
    row.shared = int(compiled.metadata.shared)
    row.fits = row.shared <= job.limit
    row.pickable = row.candidate and row.fits
    ptx = compiled.asm["ptx"]
    row.tensor_core_ops = sum(ptx.count(op) for op in TENSOR_CORE[job.target])
    return row


def _config_str(cfg: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items()) if cfg else "-"


def failures(rows: list[Row], kernels: list[tuple[str, str, Any]]) -> list[str]:
    """Every violated requirement, as one line each (empty: the check passes)."""
    out = [f"{r.kernel} [{r.config}] {r.dtype} {r.target} {r.flags}: does not compile: {r.error}"
           for r in rows if not r.ok]
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.dtype, r.target, r.flags), []).append(r)
    for (kernel, dtype, target, flags), rs in groups.items():
        if all(r.ok for r in rs) and not any(r.pickable for r in rs):
            out.append(f"{kernel} {dtype} {target} {flags}: no config left for autotuning (shared memory "
                       f"{sorted(r.shared for r in rs if r.candidate)} > {rs[0].limit})")
    out += [f"{r.kernel} [{r.config}] bf16 {r.target}: no tensor-core instruction in the PTX"
            for r in rows if r.pickable and r.dtype == "bf16" and r.uses_dot and r.tensor_core_ops == 0]
    from triton.runtime.autotuner import Autotuner

    for _, name, kernel in kernels:
        if isinstance(kernel, Autotuner):
            unrestored = read_and_written(_jit(kernel)) - set(kernel.restore_value) - set(kernel.reset_to_zero)
            if unrestored:
                out.append(f"{name}: autotuned, reads and writes {sorted(unrestored)} without restore_value: "
                           f"every tuning trial would change the output")
    return out


def summary(rows: list[Row]) -> dict[str, Any]:
    picked = [r for r in rows if r.ok and r.pickable]
    spilling = [r for r in picked if r.spill_stores > 0]
    return dict(combinations=len(rows), compile_failures=sum(not r.ok for r in rows),
                pickable=len(picked), pruned_by_shared_memory=sum(r.ok and r.candidate and not r.fits for r in rows),
                pickable_spilling=len(spilling),
                max_spill_stores_fp32=max((r.spill_stores for r in picked if r.dtype != "bf16"), default=0),
                max_spill_stores_bf16=max((r.spill_stores for r in picked if r.dtype == "bf16"), default=0),
                max_shared_by_target={t: max((r.shared for r in picked if r.target == t), default=0)
                                      for t in sorted({r.target for r in rows})})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltdist.kernels.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only configs autotuning may pick, flags all True")
    parser.add_argument("--out", type=Path, default=Path("runs/compile_check.json"))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable; default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    kernels = [k for k in discover() if not args.kernel or k[1] in args.kernel]
    todo = list(jobs(kernels, args.quick))
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, todo))
    bad = failures(rows, kernels)
    info = summary(rows)
    import triton

    info.update(kernels=[f"{m}.{n}" for m, n, _ in kernels], quick=args.quick, triton=triton.__version__,
                torch=torch.__version__, seconds=round(time.perf_counter() - t0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(summary=info, failures=bad, rows=[asdict(r) for r in rows]), indent=1))
    print(f"{'kernel':22s} {'config':50s} {'dtype':5s} {'target':6s} {'regs':>4s} {'spill':>6s} {'shared':>7s}")
    for r in rows:
        if r.ok and r.pickable and r.spill_stores > 0:
            print(f"{r.kernel:22s} {r.config + ' ' + r.flags:50s} {r.dtype:5s} {r.target:6s} {r.registers:4d} "
                  f"{r.spill_stores:6d} {r.shared:7d}")
    print(json.dumps(info, indent=1))
    for line in bad:
        print("FAIL", line, file=sys.stderr)
    print(f"compile_check: {len(rows)} combinations, {len(bad)} failures; table in {args.out}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
