"""Autotuning of the matmul kernels over configs that can launch.

Each kernel has two tile lists: small tiles for fp32 inputs (the IEEE dot runs on FMA units, with the
operand tiles in registers, so big tiles spill) and large ones for bf16 (tensor cores). The pruner
keeps the list of the input dtype, then drops every config whose compiled kernel needs more shared
memory per block than the device has (an A100 gives 163 KiB, an H100 227 KiB), so autotuning never
picks, or even benchmarks, a config that fails at launch. ``ltdist.kernels.compile_check`` applies the
same pruner to ahead-of-time compiles for sm_80 and sm_90.
"""

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

Tile = tuple[int, int, int, int, int]  # BM, BN, BK, num_warps, num_stages

# Opt-in shared memory per block in bytes of the compile check's targets (CUDA programming guide, "Technical
# Specifications per Compute Capability"): A100 and H100/H200. At run time the pruner asks the device.
SHARED_MEMORY_PER_BLOCK = {80: 166_912, 90: 232_448}


def tile_configs(tiles: Sequence[Tile]) -> list[triton.Config]:
    """One ``triton.Config`` per (BM, BN, BK, num_warps, num_stages)."""
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles]


@functools.cache
def shared_memory_limit(device_index: int) -> int:
    """Bytes of shared memory one block of a kernel on CUDA device ``device_index`` may use."""
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


class TilePruner:
    """``early_config_prune`` of :func:`autotune`: the tiles of the input dtype that fit in shared memory."""

    def __init__(self, dtype_arg: str, fp32_tiles: Sequence[Tile], tc_tiles: Sequence[Tile]):
        self.dtype_arg = dtype_arg  # the pointer argument whose dtype picks the tile list
        self.fp32 = tile_configs(fp32_tiles)
        self.tc = tile_configs(tc_tiles)
        self.kernel: Any = None  # the JITFunction, set by autotune()

    @property
    def configs(self) -> list[triton.Config]:
        if INTERPRET:  # the interpreter: one small tile, no tuning runs (tests may set more)
            return tile_configs([(16, 16, 16, 1, 1)])
        return self.fp32 + self.tc

    def candidates(self, configs: Sequence[triton.Config], dtype: torch.dtype) -> list[triton.Config]:
        """The configs meant for inputs of ``dtype`` (all of them under the interpreter)."""
        if INTERPRET:
            return list(configs)
        pool = self.fp32 if dtype == torch.float32 else self.tc
        return [c for c in configs if c in pool]

    def fitting(self, configs: Sequence[triton.Config], shared_bytes: Callable[[triton.Config], int],
                limit: int) -> list[triton.Config]:
        """The configs whose kernel needs at most ``limit`` bytes of shared memory; raise if none does."""
        kept = [c for c in configs if shared_bytes(c) <= limit]
        if not kept:
            raise RuntimeError(f"{self.kernel.__name__}: none of the configs {[str(c) for c in configs]} fits in "
                               f"{limit} bytes of shared memory per block on this GPU")
        return kept

    def __call__(self, configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        ref = named_args[self.dtype_arg]
        candidates = self.candidates(configs, ref.dtype)
        if INTERPRET or ref.device.type != "cuda":
            return candidates
        # the launch's own constexprs, without the autotuner's launch options
        meta = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        # warmup compiles without launching; autotuning then reuses the compiled kernel
        shared = lambda c: self.kernel.warmup(grid=(1,), **named_args, **meta, **c.all_kwargs()).metadata.shared
        return self.fitting(candidates, shared, shared_memory_limit(ref.device.index))


def autotune(*, key: list[str], dtype_arg: str, fp32_tiles: Sequence[Tile], tc_tiles: Sequence[Tile],
             restore_value: list[str] | None = None) -> Callable:
    """``triton.autotune`` with a :class:`TilePruner`. ``restore_value`` names every output buffer the kernel
    also reads (accumulation): autotuning runs each config on the real buffers and must undo each trial."""
    pruner = TilePruner(dtype_arg, fp32_tiles, tc_tiles)

    def wrap(fn: Any) -> Any:
        pruner.kernel = fn
        return triton.autotune(configs=pruner.configs, key=key, restore_value=restore_value,
                               prune_configs_by={"early_config_prune": pruner})(fn)

    return wrap
