"""Crash-safe file writes: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def torch_save_atomic(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`write_atomic`."""
    return write_atomic(path, lambda f: torch.save(obj, f))
