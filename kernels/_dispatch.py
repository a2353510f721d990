"""Choosing between the Triton fast path and the PyTorch reference of a kernel, and the checks every
call gets first (one device for all tensors; a GPU the Triton kernels support)."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch

REFERENCE_ENV = "LTDIST_KERNELS"
MIN_CAPABILITY = (8, 0)  # bf16 tensor-core dots and the autotune configs need sm_80 (A100) or newer


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


@functools.cache
def capability_supported(device_index: int) -> bool:
    """True for sm_80+; else warn (once per device) that the reference ops run instead."""
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) >= MIN_CAPABILITY:
        return True
    warnings.warn(f"ltdist.kernels: {torch.cuda.get_device_name(device_index)} is sm_{major}{minor}; the Triton "
                  f"kernels need sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or newer, so the PyTorch reference ops "
                  f"run instead (slower, same results)", RuntimeWarning, stacklevel=4)
    return False


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming each tensor's device unless all of ``tensors`` share one."""
    if len({t.device for t in tensors.values()}) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")


def use_triton(op: str, **tensors: torch.Tensor) -> bool:
    """Check that ``tensors`` (by argument name) share a device, then say whether the Triton kernels run:
    the device is a CUDA GPU of sm_80 or newer, triton imports, ``LTDIST_KERNELS`` is not ``reference``
    and the call is not inside :func:`reference_kernels`."""
    check_same_device(op, **tensors)
    if _forced_reference or os.environ.get(REFERENCE_ENV, "").lower() == "reference":
        return False
    device = next(iter(tensors.values())).device
    if device.type != "cuda" or not triton_available():
        return False
    return capability_supported(device.index if device.index is not None else torch.cuda.current_device())
