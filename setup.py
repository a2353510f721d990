"""Builds the C++/CUDA extension ``ltdist._C`` from ``csrc/``.

C++ sources (``csrc/*.cpp``) are always compiled, with OpenMP. CUDA sources (``csrc/cuda/*.cu``)
are added when a CUDA toolkit *and* a CUDA build of torch are present, or when ``FORCE_CUDA=1``.
The ``.cu`` files hold plain launchers (raw pointers + ``cudaStream_t``) and include no
torch headers, so they also compile with a bare nvcc; the C++ binding calls them.

The C++ standard is the one ``torch.utils.cpp_extension`` adds for the torch being built against
(C++20 for torch 2.14's headers). The toolkit is CUDA_HOME, else CUDA_PATH, else the one of the
``nvcc`` on the PATH. ``TORCH_CUDA_ARCH_LIST`` defaults to sm_80 and sm_90 code plus sm_90 PTX, which
newer GPUs compile at load time.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _packages() -> list[str]:
    pkgs = ["ltdist", *(f"ltdist.{p}" for p in find_packages("ltdist"))]
    pkgs += ["ltdist.kernels", *(f"ltdist.kernels.{p}" for p in find_packages("kernels"))]
    return pkgs


def _cuda_home() -> str | None:
    """The CUDA toolkit root. torch guesses dirname(dirname(nvcc)), which is wrong when the ``nvcc`` on
    the PATH is a wrapper or a link (/usr/local/bin/nvcc): ask nvcc itself where it lives."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        top = None
    root = os.path.realpath(top.group(1).strip()) if top else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return root if os.path.isdir(os.path.join(root, "include")) else None


def _extensions() -> tuple[list, dict]:
    if os.environ.get("LTDIST_NO_EXTENSION") == "1":
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("setup.py: torch is not installed; building ltdist without ltdist._C", file=sys.stderr)
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (CUDA_HOME is not None and torch.version.cuda is not None)
    cxx = ["-O3", "-fopenmp"]
    macros = []
    kwargs = dict(
        name="ltdist._C",
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda and cu:
        macros.append(("LTDIST_WITH_CUDA", None))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        ext = CUDAExtension(sources=cpp + cu, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension(sources=cpp, define_macros=macros, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(packages=_packages(), ext_modules=ext_modules, cmdclass=cmdclass)
