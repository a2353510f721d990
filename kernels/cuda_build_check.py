"""Checks an ltdist._C built against the CUDA build of torch, on a machine without a GPU (``make check-cuda-build``).

Run as a script by the interpreter of that torch (ltdist itself need not be installed there)::

    python kernels/cuda_build_check.py BUILD_LIB_DIR

Asserts: the module was built with CUDA; every ``torch.ops.ltdist`` op has a CUDA, a CPU and a Meta kernel;
the shared object holds sm_80 and sm_90 code and PTX for the newest target (so GPUs after sm_90 can run
it). Prints one line per op and the embedded code.
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import torch

DISPATCH_KEYS = ("CPU", "CUDA", "Meta")
EXPECTED_ELF = {"sm_80", "sm_90"}
EXPECTED_PTX = "sm_90"


def cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy shipped with triton."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def embedded_code(so: str) -> tuple[set[str], set[str]]:
    """(architectures with SASS, architectures with PTX) embedded in ``so``."""
    tool = cuobjdump()
    if tool is None:
        raise SystemExit("cuda_build_check: cuobjdump not found (CUDA toolkit or triton)")
    out = subprocess.run([tool, "--list-elf", "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    elf = set(re.findall(r"ELF file\s+\d+:.*\.(sm_\d+a?)\.cubin", out))
    ptx = set(re.findall(r"PTX file\s+\d+:.*\.(sm_\d+a?)\.ptx", out))
    return elf, ptx


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    libs = glob.glob(os.path.join(argv[0], "ltdist", "_C*.so"))
    if len(libs) != 1:
        print(f"cuda_build_check: expected one ltdist/_C*.so under {argv[0]}, found {libs}", file=sys.stderr)
        return 1
    so = libs[0]
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}")
    spec = importlib.util.spec_from_file_location("ltdist._C", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # loading registers the ops with the dispatcher
    problems = [] if module.with_cuda else [f"{so} was built without CUDA (with_cuda is False)"]
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ltdist::"))
    if not ops:
        problems.append("no ltdist:: op registered")
    for op in ops:
        has = {key: torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for key in DISPATCH_KEYS}
        print(f"{op:28s} " + " ".join(f"{k}={'yes' if v else 'NO'}" for k, v in has.items()))
        problems += [f"{op} has no {k} kernel" for k, v in has.items() if not v]
    elf, ptx = embedded_code(so)
    print(f"embedded SASS: {sorted(elf)}, PTX: {sorted(ptx)}")
    if EXPECTED_ELF - elf:
        problems.append(f"SASS for {sorted(EXPECTED_ELF - elf)} missing")
    if EXPECTED_PTX not in ptx:
        problems.append(f"no {EXPECTED_PTX} PTX: GPUs newer than sm_90 could not run the kernels")
    for p in problems:
        print("FAIL", p, file=sys.stderr)
    print(f"cuda_build_check: {len(ops)} ops, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
