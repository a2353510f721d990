"""Choosing between the Triton fast path and the PyTorch reference of a kernel."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

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
    ``LTDIST_KERNELS`` not set to ``reference`` (nor inside :func:`reference_kernels`)."""
    if _forced_reference or os.environ.get(REFERENCE_ENV, "").lower() == "reference":
        return False
    return all(t.is_cuda for t in tensors) and triton_available()


_forced_reference = 0  # >0 inside reference_kernels(): nesting-safe


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run the PyTorch reference of every kernel inside the block, whatever the device.

    For code that differentiates twice (the MPCL virtual step): the Triton ops have no double backward.
    """
    global _forced_reference
    _forced_reference += 1
    try:
        yield
    finally:
        _forced_reference -= 1
