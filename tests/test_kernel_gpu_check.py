"""make gpu-check on a CPU-only machine: refuses clearly, and the GPU tests are collected and skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ltdist.kernels import gpu_check

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_refuses_without_a_gpu(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()


def test_gpu_tests_are_collected_and_skipped_without_a_gpu(tmp_path):
    files = gpu_check.gpu_test_files()
    assert {TESTS / "test_kernel_gpu.py", TESTS / "test_cuda_compile.py"} <= set(files)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", *map(str, files)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("test_cosine_cross_entropy_forward_backward" in i for i in ids)
    assert any("test_cuda_sampler_matches_cpu_sampler[d=5000]" in i for i in ids)
    assert not any("test_cuda_source_compiles" in i for i in ids)  # not marked gpu


def test_junit_counts_reach_the_report(tmp_path, monkeypatch):
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "def test_ok():\n    pass\n"
        "def test_bad():\n    assert 1 == 2\n"
        "@pytest.mark.skip(reason='x')\ndef test_skipped():\n    pass\n")
    monkeypatch.setattr(gpu_check, "TESTS", tmp_path)
    result = gpu_check.run_tests(tmp_path, timeout=120)
    assert (result["tests"], result["failures"], result["skipped"]) == (3, 1, 1)
    assert result["exit_status"] == 1 and not result["timed_out"]
    assert result["failed"] == ["test_fake::test_bad"]
    json.dumps(result)  # the report is plain JSON
