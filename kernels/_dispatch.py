"""Choosing between the Triton fast path and the PyTorch reference of a kernel."""

from __future__ import annotations

import functools
import os

import torch

REFERENCE_ENV = "LTDIST_KERNELS"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run: every tensor on CUDA, triton importable, and
    ``LTDIST_KERNELS`` not set to ``reference``."""
    if os.environ.get(REFERENCE_ENV, "").lower() == "reference":
        return False
    return all(t.is_cuda for t in tensors) and triton_available()
