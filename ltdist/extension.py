"""Loading the compiled extension ``ltdist._C`` and the ops it registers (``torch.ops.ltdist``)."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

BUILD_HINT = (
    "ltdist._C (the C++/CUDA extension) is not built. Build it from the repository root with\n"
    "    make install            # or: pip install --no-build-isolation -e .\n"
    "(set FORCE_CUDA=1 to compile the CUDA kernels without a visible GPU)."
)


class ExtensionNotBuiltError(ImportError):
    """Raised when an op needs ``ltdist._C`` and it cannot be imported."""


@functools.cache
def load_extension() -> ModuleType:
    """Import ``ltdist._C`` once; raise :class:`ExtensionNotBuiltError` with build instructions."""
    try:
        from ltdist import _C
    except ImportError as exc:
        raise ExtensionNotBuiltError(f"{BUILD_HINT}\n(import error: {exc})") from exc
    return _C


def extension_available() -> bool:
    try:
        load_extension()
    except ExtensionNotBuiltError:
        return False
    return True


def group_by_class(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable grouping of samples by class (CSR layout).

    Args:
        labels: [N] int64 class ids in ``[0, num_classes)``.
    Returns:
        order [N] int64 (sample indices grouped by class, input order kept within a class) and
        offsets [C+1] int64 (class ``c`` owns ``order[offsets[c]:offsets[c+1]]``).
    """
    load_extension()
    return torch.ops.ltdist.group_by_class(labels, num_classes)
