"""The CUDA sources compile with nvcc for sm_80 and sm_90 with registers that fit their launch bounds, and
on a GPU match the CPU sampler."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return found or (str(Path(home) / "bin" / "nvcc") if (Path(home) / "bin" / "nvcc").exists() else None)


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC / 'cuda'}"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source: Path, arch: str, tmp_path: Path):
    obj = tmp_path / f"{source.stem}_{arch}.o"
    cmd = [_nvcc(), "-c", "-std=c++17", "-O3", "-DLTDIST_WITH_CUDA", f"-arch={arch}", f"-I{CSRC}", "-Xptxas", "-v",
           str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed for {source.name} ({arch}):\n{proc.stderr}"
    assert obj.stat().st_size > 0
    # every kernel declares the most threads it is launched with, and ptxas keeps its registers within
    # the 64K register file for that many threads (else a launch fails with "too many resources")
    text = source.read_text()
    bounds = re.findall(r"__global__ void __launch_bounds__\((\w+)\)", text)
    assert len(bounds) == text.count("__global__"), f"{source.name}: a kernel without __launch_bounds__"
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", proc.stderr)]
    assert registers, proc.stderr
    for name in bounds:
        threads = int(re.search(rf"constexpr int {name} = (\d+);", text).group(1)) if not name.isdigit() else int(name)
        assert max(registers) * threads <= 65536, f"{max(registers)} registers × {threads} threads"
    assert re.findall(r"(\d+) bytes spill stores", proc.stderr) == ["0"] * len(registers), proc.stderr


def _cuda_extension() -> bool:
    if not torch.cuda.is_available():
        return False
    from ltdist.extension import extension_available, load_extension

    return extension_available() and bool(load_extension().with_cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_extension(), reason="needs a GPU and ltdist._C built with CUDA")
@pytest.mark.parametrize("d", [100, 2048, 5000], ids=lambda d: f"d={d}")  # 5000: two column tiles per block row
def test_cuda_sampler_matches_cpu_sampler(d: int):
    from ltdist.kernels.calibrated_sampler import calibrated_sample, group_bank

    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([3, 40, 70, 1])])
    bank, offsets = group_bank(torch.randn(labels.numel(), d, generator=g), labels, 4)
    centres = torch.stack([bank[offsets[c]:offsets[c + 1]].mean(0) for c in range(4)])
    args = (bank, offsets, centres, bank[:2].clone(), torch.tensor([0, 0]), torch.tensor([[1, 2, 3], [2, 1, 3]]),
            torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]))
    cpu = calibrated_sample(*args, 0.4, 0.05, samples_per_source=19, seed=3)
    gpu = calibrated_sample(*(t.cuda() for t in args), 0.4, 0.05, samples_per_source=19, seed=3)
    # same counter-based random stream on both devices: equal up to float rounding
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
