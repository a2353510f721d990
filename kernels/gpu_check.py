"""One command for a lent GPU: ``python -m ltdist.kernels.gpu_check`` (``make gpu-check``).

Runs the GPU tests (``pytest -m gpu``: every Triton op and the CUDA sampler against the references, forward
and backward, fp32 and bf16), then the kernel benchmarks (``ltdist.kernels.bench``, without torch.compile
unless ``--with-compile``), and writes one JSON with the versions, the GPU, the test outcome and the
benchmark figures to ``--out``/gpu_check.json. Each part runs under its own time limit (defaults: 240 s
and 150 s), so the whole check stays under 8 minutes on one H100/H200. Exit status 0 only when every GPU
test passed and the benchmarks finished.

Only the test files that hold GPU tests are collected, so the training stack's dependencies (DeepSpeed,
webdataset, ...) need not be installed where the check runs: torch, triton and pytest suffice.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"


def environment() -> dict[str, Any]:
    """Versions and the GPU (name, compute capability, memory, SMs)."""
    info: dict[str, Any] = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = dict(name=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                           memory_gib=round(p.total_memory / 2**30, 1), count=torch.cuda.device_count())
    return info


def _run(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, float]:
    """(exit status, or None when it ran past ``timeout``; seconds), output to ``log``."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc: int | None = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, round(time.perf_counter() - t0, 1)


def gpu_test_files() -> list[Path]:
    """The test files that mark tests with ``pytest.mark.gpu``."""
    return sorted(p for p in TESTS.glob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def run_tests(out: Path, timeout: float) -> dict[str, Any]:
    """``pytest -m gpu`` over :func:`gpu_test_files`; counts and failed test ids from its JUnit XML."""
    junit = out / "gpu_tests.xml"
    # --rootdir fixes the test ids ("test_kernel_gpu::test_x"): pytest otherwise derives them from the
    # common ancestor of the test files and the working directory, which depends on where it is run from.
    rc, seconds = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                        f"--rootdir={TESTS}", f"--junitxml={junit}", *map(str, gpu_test_files())], timeout,
                       out / "gpu_tests.log")
    result: dict[str, Any] = dict(exit_status=rc, seconds=seconds, timed_out=rc is None)
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        result["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                            if case.find("failure") is not None or case.find("error") is not None]
    return result


def run_bench(out: Path, timeout: float, budget: float, with_compile: bool) -> dict[str, Any]:
    """The kernel benchmarks at the GPU shapes; their results.json is embedded."""
    cmd = [sys.executable, "-m", "ltdist.kernels.bench", "--out", str(out / "bench"), "--budget", str(budget)]
    rc, seconds = _run(cmd if with_compile else [*cmd, "--no-compile"], timeout, out / "bench.log")
    result: dict[str, Any] = dict(exit_status=rc, seconds=seconds, timed_out=rc is None)
    path = out / "bench" / "results.json"
    if rc == 0 and path.exists():
        result.update(json.loads(path.read_text()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltdist.kernels.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--test-timeout", type=float, default=240.0, help="seconds for pytest -m gpu")
    parser.add_argument("--bench-timeout", type=float, default=150.0, help="seconds for the benchmarks")
    parser.add_argument("--budget", type=float, default=0.2, help="seconds of repeats per benchmarked implementation")
    parser.add_argument("--with-compile", action="store_true", help="also time torch.compile (minutes more)")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; this check needs a GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = dict(environment=environment(), tests=run_tests(args.out, args.test_timeout))
    tests = report["tests"]
    print(f"gpu tests: {tests.get('tests', 0)} run, {tests.get('failures', 0)} failed, {tests.get('errors', 0)} "
          f"errors, {tests.get('skipped', 0)} skipped in {tests['seconds']} s"
          + (" (TIMED OUT)" if tests["timed_out"] else ""), flush=True)
    for name in tests.get("failed", []):
        print("FAIL", name)
    if not args.skip_bench:
        report["bench"] = run_bench(args.out, args.bench_timeout, args.budget, args.with_compile)
        print(f"benchmarks: exit status {report['bench']['exit_status']} in {report['bench']['seconds']} s", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'gpu_check.json'} ({report['seconds']} s)")
    ok = tests["exit_status"] == 0 and (args.skip_bench or report["bench"]["exit_status"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
