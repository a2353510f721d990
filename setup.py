"""Builds the C++/CUDA extension ``ltdist._C`` from ``csrc/``.

C++ sources (``csrc/*.cpp``) are always compiled, with OpenMP. CUDA sources (``csrc/cuda/*.cu``)
are added when a CUDA toolkit *and* a CUDA build of torch are present, or when ``FORCE_CUDA=1``.
The ``.cu`` files hold plain launchers (raw pointers + ``cudaStream_t``) and include no
torch headers, so they also compile with a bare nvcc; the C++ binding calls them.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup


def _packages() -> list[str]:
    pkgs = ["ltdist", *(f"ltdist.{p}" for p in find_packages("ltdist"))]
    pkgs += ["ltdist.kernels", *(f"ltdist.kernels.{p}" for p in find_packages("kernels"))]
    return pkgs


def _extensions() -> tuple[list, dict]:
    if os.environ.get("LTDIST_NO_EXTENSION") == "1":
        return [], {}
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
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    macros = []
    kwargs = dict(
        name="ltdist._C",
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda and cu:
        macros.append(("LTDIST_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(sources=cpp + cu, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension(sources=cpp, define_macros=macros, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(packages=_packages(), ext_modules=ext_modules, cmdclass=cmdclass)
