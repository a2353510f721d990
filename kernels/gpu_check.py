"""One command for a GPU node: ``python -m ltdist.kernels.gpu_check`` (``make gpu-check``), one JSON of everything.

From a bare start on one GPU (the node's own torch and Triton, no network), in parts, each under its own time
limit and all together under ``--budget`` seconds (default 470: under 8 minutes on one H100/H200):

``install``
    the carried wheels (``make gpu-bundle``: :mod:`ltdist.kernels.gpu_bundle`) that this Python lacks,
    into ``<out>/site``, which then comes first on ``PYTHONPATH`` (and ``<out>/site/bin`` on ``PATH``) for
    every later part; DeepSpeed, webdataset, submitit and OmegaConf must then import.
``build``
    ``ltdist._C`` with its CUDA kernels against the node's torch (``setup.py build_ext --inplace``,
    ``TORCH_CUDA_ARCH_LIST`` = the GPU's compute capability, ``MAX_JOBS`` = every core), timed; every
    ``torch.ops.ltdist`` op must then have a CUDA kernel.
``tests``
    ``pytest -m gpu``: every Triton op and the CUDA sampler against the references, forward and backward,
    fp32 and bf16 (JUnit counts and failed test ids).
``pipeline``
    every stage end to end on the GPU (:mod:`ltdist.kernels.gpu_check_pipeline`): ResNet-50 at 224 px, bf16,
    DeepSpeed ZeRO-1, the Triton cosine head; an MPCL run with the meta step; extract, kt, mpfa, evaluate;
    each stage's result checked.
``throughput``
    ``ltdist bench engine --device cuda`` (ResNet-50, 224 px, bf16, ZeRO-1): DeepSpeed's step against a plain
    torch loop, images/s, channels-last against contiguous; the pipeline run's images/s and the share of
    time it waited for the loader (is the GPU fed?); the kernel benchmarks (``ltdist bench kernels``) against
    eager and ``torch.compile`` at the iNaturalist shapes.
``weights``
    ltdist's ResNet-50/152 and ResNeXt-50 load torchvision's ``state_dict()`` of the same architecture
    (:func:`ltdist.models.weights.load_backbone_state`) and then compute the same features.

``--out``/gpu_check.json (rewritten after every part) holds the versions, the GPU, each part's status
(passed / failed / timed_out / skipped), seconds, limit and figures. Exit status 0 only when every part
passed; 2 when no GPU is visible.

``--dry-run`` (on a CPU, part of the test suite so that the check cannot rot): the same parts at a tiny
size on the CPU — the bundle is installed into the scratch target when ``.whl/`` holds one (a bundle for
another Python version is unpacked, not imported), the pipeline and the engine benchmark run on the CPU,
``weights`` runs when torchvision is importable; the parts that need CUDA (``build``, ``tests``, the kernel
benchmarks) are reported as skipped. Exit status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PARTS = ("install", "build", "tests", "pipeline", "throughput", "weights")
# Seconds per part on one H100/H200 (what each needs with room to spare); --budget caps the sum.
LIMITS = dict(install=60, build=150, tests=150, pipeline=180, throughput=150, weights=60)
WEIGHT_ARCHS = ("resnet50", "resnet152", "resnext50_32x4d")


class Skipped(Exception):
    """A part that cannot run here (the reason is the message)."""


def environment() -> dict[str, Any]:
    """Versions and the GPU (name, compute capability, memory, SMs), and the CPU count."""
    info: dict[str, Any] = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                                cpus=os.cpu_count())
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


def _run(cmd: list[str], timeout: float, log: Path, env: dict[str, str] | None = None) -> tuple[int | None, float]:
    """(exit status, or None when it ran past ``timeout``; seconds), output to ``log``."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc: int | None = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                                            env=env).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, round(time.perf_counter() - t0, 1)


def _checked(cmd: list[str], timeout: float, log: Path, env: dict[str, str] | None = None) -> float:
    """:func:`_run` that raises on failure (the log's tail in the message); returns seconds."""
    rc, seconds = _run(cmd, timeout, log, env)
    if rc is None:
        raise TimeoutError(f"{' '.join(cmd[:5])} ... ran past {timeout:.0f} s (see {log})")
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:5])} ... exited {rc} (see {log}):\n{tail}")
    return seconds


# ---- parts: each takes (out, dry_run, limit seconds) and returns its figures, or raises ----------------------
def part_install(out: Path, dry_run: bool, limit: float, wheels: Path) -> dict[str, Any]:
    from ltdist.kernels import gpu_bundle

    if not (wheels / gpu_bundle.MANIFEST).is_file():
        raise Skipped(f"no bundle in {wheels} (run `make gpu-bundle` where pip reaches PyPI)")
    site = out / "site"
    result = gpu_bundle.install(wheels, site, everything=dry_run)
    if result["same_python"]:
        result["imports"] = gpu_bundle.check_imports(site, timeout=limit)
    else:
        result["imports"] = f"not imported: the bundle is for CPython {result['python_version']}"
    if not dry_run:  # every later part (and the processes they start) sees the installed wheels first
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
        os.environ["PATH"] = os.pathsep.join((str(site / "bin"), os.environ.get("PATH", "")))
        sys.path.insert(0, str(site))
    return result


def part_build(out: Path, dry_run: bool, limit: float) -> dict[str, Any]:
    if dry_run:
        raise Skipped("needs CUDA (the dry run uses the CPU extension of `make install`)")
    major, minor = torch.cuda.get_device_capability(0)
    env = {**os.environ, "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
           "MAX_JOBS": str(os.cpu_count() or 1)}
    seconds = _checked([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], limit, out / "build.log", env)
    probe = ("import json, torch, ltdist._C\n"
             "ops = [n for n in dir(torch.ops.ltdist) if not n.startswith('_')]\n"
             "print(json.dumps({n: torch._C._dispatch_has_kernel_for_dispatch_key(f'ltdist::{n}', 'CUDA') "
             "for n in ops}))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"ltdist._C does not import after the build:\n{proc.stderr[-2000:]}")
    cuda_ops = json.loads(proc.stdout.strip().splitlines()[-1])
    if not cuda_ops or not all(cuda_ops.values()):
        raise AssertionError(f"ops without a CUDA kernel: {cuda_ops}")
    return dict(seconds=seconds, arch=f"sm_{major}{minor}", max_jobs=int(env["MAX_JOBS"]), cuda_ops=cuda_ops)


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


def part_tests(out: Path, dry_run: bool, limit: float) -> dict[str, Any]:
    if dry_run:
        raise Skipped("needs CUDA")
    result = run_tests(out, limit)
    if result["timed_out"]:
        raise TimeoutError(f"pytest -m gpu ran past {limit:.0f} s: {result}")
    if result["exit_status"] != 0 or not result.get("tests"):
        raise AssertionError(f"GPU tests failed: {result}")
    return result


def part_pipeline(out: Path, dry_run: bool, limit: float) -> dict[str, Any]:
    from ltdist.kernels import gpu_check_pipeline

    return gpu_check_pipeline.run(out / "pipeline", "dry-run" if dry_run else "gpu", "cpu" if dry_run else "cuda",
                                  time.monotonic() + limit)


def _engine_bench(out: Path, name: str, case: str, device: str, extra: list[str], timeout: float) -> dict[str, Any]:
    """One ``ltdist bench engine`` run: per loop ms/step and images/s, and DeepSpeed's step / the plain step."""
    _checked([sys.executable, "-m", "ltdist.cli", "bench", "engine", "--device", device, "--cases", case,
              "--precision", "bf16", "--zero-stage", "1", "--out", str(out / name), *extra], timeout,
             out / f"{name}.log")
    row = json.loads((out / name / "results.json").read_text())["results"][0]
    loops = {loop: dict(ms=round(1e3 * s["wall_s"], 2), images_per_s=round(row["batch"] / s["wall_s"], 1),
                        per_plain_step=round(s["paired_wall"], 3)) for loop, s in row["loops"].items()}
    return dict(case=case, channels_last=row["channels_last"], loops=loops)


def part_throughput(out: Path, dry_run: bool, limit: float, pipeline: dict[str, Any] | None,
                    with_compile: bool) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    device, case = ("cpu", "resnet8:16:8") if dry_run else ("cuda", "resnet50:224:128")
    steps = ["--steps", "2", "--warmup", "1"] if dry_run else ["--steps", "10", "--warmup", "3"]
    bench = out / "throughput"
    bench.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    result["engine"] = _engine_bench(bench, "engine", case, device, [*steps, "--channels-last"],
                                     deadline - time.monotonic())
    ds = result["engine"]["loops"]["ltdist"]
    result["deepspeed_per_plain_step"] = ds["per_plain_step"]
    if not dry_run:  # the same command with other flags: the dry run leaves these out for time
        result["engine_contiguous"] = _engine_bench(bench, "engine_contiguous", case, device,
                                                    [*steps, "--no-channels-last"], deadline - time.monotonic())
        result["channels_last_speedup"] = round(result["engine_contiguous"]["loops"]["ltdist"]["ms"] / ds["ms"], 3)
    if with_compile:
        result["engine_compiled"] = _engine_bench(bench, "engine_compiled", case, device,
                                                  [*steps, "--channels-last", "--compile"], deadline - time.monotonic())
        result["compile_speedup"] = round(ds["ms"] / result["engine_compiled"]["loops"]["ltdist"]["ms"], 3)
    if pipeline and "train" in pipeline:  # the real run: the loader and the step at the same time
        train = pipeline["train"]
        result["training_run"] = dict(images_per_s=train["images_per_s"], engine_images_per_s=ds["images_per_s"],
                                      data_wait_fraction=train["data_wait_fraction"],
                                      gpu_fed=train["data_wait_fraction"] < 0.1)
    if dry_run:
        result["kernels"] = "skipped: needs CUDA"
        return result
    kernels = bench / "kernels"
    rc, seconds = _run([sys.executable, "-m", "ltdist.cli", "bench", "kernels", "--out", str(kernels),
                        "--budget", "0.2"], deadline - time.monotonic(), bench / "kernels.log")
    if rc != 0:
        raise RuntimeError(f"ltdist bench kernels: exit status {rc} after {seconds} s (see {bench / 'kernels.log'})")
    result["kernels"] = dict(seconds=seconds, **json.loads((kernels / "results.json").read_text()))
    return result


def part_weights(out: Path, dry_run: bool, limit: float) -> dict[str, Any]:
    try:
        import torchvision
    except ImportError as e:
        raise Skipped(f"torchvision is not importable ({e})") from e
    from ltdist.models import build_model, weights  # weights (issue 23) is imported here and used here only

    device = torch.device("cpu" if dry_run else "cuda")
    archs = WEIGHT_ARCHS[:1] if dry_run else WEIGHT_ARCHS
    result = {}
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64 if dry_run else 224, 64 if dry_run else 224, device=device)
    for arch in archs:
        reference = getattr(torchvision.models, arch)(weights=None).eval()
        reference.fc = torch.nn.Identity()  # the 2048-d features, as ltdist's backbone returns them
        ours = build_model(arch, num_classes=10, channels=3).backbone.eval()
        weights.load_backbone_state(ours, reference.state_dict(), "torchvision")
        with torch.no_grad():
            a, b = ours.to(device)(x), reference.to(device)(x)
        diff = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        if not diff < 1e-4:
            raise AssertionError(f"{arch}: features differ from torchvision's by {diff:.2e} (relative max)")
        result[arch] = dict(parameters=sum(p.numel() for p in ours.parameters()), relative_max_diff=diff)
        del ours, reference
    result["torchvision"] = torchvision.__version__
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltdist.kernels.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the bundle of `make gpu-bundle`")
    parser.add_argument("--dry-run", action="store_true", help="on a CPU: every part that needs no CUDA, tiny")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all parts together")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--with-compile", action="store_true",
                        help="also time the engine step with trainer.compile (torch.compile of the backbone)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; this check needs a GPU (or --dry-run)", file=sys.stderr)
        return 2
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report: dict[str, Any] = dict(mode="dry-run" if args.dry_run else "gpu", environment=environment(),
                                  budget_s=args.budget, parts={})
    runners: dict[str, Callable[[float], dict[str, Any]]] = {
        "install": lambda limit: part_install(args.out, args.dry_run, limit, args.wheels),
        "build": lambda limit: part_build(args.out, args.dry_run, limit),
        "tests": lambda limit: part_tests(args.out, args.dry_run, limit),
        "pipeline": lambda limit: part_pipeline(args.out, args.dry_run, limit),
        "throughput": lambda limit: part_throughput(args.out, args.dry_run, limit,
                                                    report["parts"].get("pipeline", {}).get("figures"),
                                                    args.with_compile),
        "weights": lambda limit: part_weights(args.out, args.dry_run, limit),
    }
    for name in (p for p in PARTS if p in args.parts):
        limit = min(LIMITS[name], args.budget - (time.monotonic() - start))
        entry: dict[str, Any] = dict(limit_s=round(limit, 1))
        t0 = time.monotonic()
        try:
            if limit < 5:
                raise TimeoutError(f"the check's budget of {args.budget:.0f} s is spent")
            entry["figures"] = runners[name](limit)
            entry["status"] = "passed"
        except Skipped as e:
            entry.update(status="skipped", reason=str(e))
        except (TimeoutError, subprocess.TimeoutExpired) as e:
            entry.update(status="timed_out", reason=str(e))
        except Exception as e:  # a failed part is reported; the next part still runs
            entry.update(status="failed", reason=f"{type(e).__name__}: {e}")
        entry["seconds"] = round(time.monotonic() - t0, 1)
        report["parts"][name] = entry
        report["seconds"] = round(time.monotonic() - start, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"{name:<11}{entry['status']:<10}{entry['seconds']:>7.1f} s" +
              (f"  {entry['reason'].splitlines()[0]}" if "reason" in entry else ""), flush=True)
    statuses = [p["status"] for p in report["parts"].values()]
    ok = all(s == "passed" or (args.dry_run and s == "skipped") for s in statuses)
    report["passed"] = ok
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"{'PASSED' if ok else 'FAILED'}: wrote {args.out / 'gpu_check.json'} ({report['seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
