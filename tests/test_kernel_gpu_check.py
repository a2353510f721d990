"""The GPU check without a GPU: it refuses a plain run, and its dry run (every part that needs no CUDA, at a
tiny size on the CPU) passes and reports each part in one JSON, so the check cannot rot between GPU visits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ltdist.kernels import gpu_check, gpu_check_pipeline

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


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


def test_dry_run_runs_every_part_that_needs_no_cuda(tmp_path):
    """The real command on the CPU: synthetic shards, both launches (bf16, ZeRO-1, MPCL meta step), extract,
    kt, mpfa, evaluate with their results checked, and the engine benchmark; one JSON."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "ltdist.kernels.gpu_check", "--dry-run", "--out", str(out),
                           "--wheels", str(tmp_path / "no-bundle")], capture_output=True, text=True, timeout=400,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["passed"] is True
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    status = {name: p["status"] for name, p in parts.items()}
    assert status == {"install": "skipped", "build": "skipped", "tests": "skipped", "pipeline": "passed",
                      "throughput": "passed", "weights": status["weights"]}
    assert "make gpu-bundle" in parts["install"]["reason"] and "CUDA" in parts["build"]["reason"]
    pipeline = parts["pipeline"]["figures"]
    size = gpu_check_pipeline.SIZES["dry-run"]
    assert pipeline["train"]["steps"] == size.steps and pipeline["train"]["last_loss"] < pipeline["train"]["first_loss"]
    assert {"cosine", "ensemble"} <= set(pipeline["evaluate"]["top1_all"])
    assert min(pipeline["evaluate"]["top1_all"].values()) > pipeline["evaluate"]["above"] > 1 / size.classes
    assert pipeline["mpcl"]["meta_steps"] >= size.mpcl_steps
    engine = parts["throughput"]["figures"]["engine"]
    assert set(engine["loops"]) == {"plain", "deepspeed", "ltdist"} and engine["loops"]["plain"]["images_per_s"] > 0
    assert engine["channels_last"] is True  # forced on (auto would be contiguous on the CPU)
    assert "PASSED" in proc.stdout and "pipeline   passed" in proc.stdout
    if status["weights"] == "skipped":  # torchvision is not importable on the CPU machines
        assert "torchvision" in parts["weights"]["reason"]


def test_a_failing_part_fails_the_check_and_the_next_part_still_runs(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("the training loss did not fall: [2.0, 2.1]")

    monkeypatch.setattr(gpu_check_pipeline, "run", broken)
    monkeypatch.setattr(gpu_check, "part_throughput", lambda *a: {"ran": True})
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "pipeline", "throughput"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is False
    assert report["parts"]["pipeline"]["status"] == "failed"
    assert "did not fall" in report["parts"]["pipeline"]["reason"]
    assert report["parts"]["throughput"] == {**report["parts"]["throughput"], "status": "passed",
                                             "figures": {"ran": True}}


def test_the_budget_caps_every_part(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(gpu_check, "part_throughput", lambda out, dry, limit, *a: seen.append(limit) or {})
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "throughput", "--budget", "30"]) == 0
    assert seen and seen[0] <= 30
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "throughput", "--budget", "2"]) == 1
    entry = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["throughput"]
    assert entry["status"] == "timed_out" and "budget" in entry["reason"]


def test_stage_checks_catch_what_they_are_for():
    rec = [dict(step=s, loss=v, images_per_s=100.0, data_wait_fraction=0.0) for s, v in ((2, 2.0), (4, 1.5))]
    assert gpu_check_pipeline.check_training(rec, 4)["last_loss"] == 1.5
    with pytest.raises(AssertionError, match="did not fall"):
        gpu_check_pipeline.check_training([{**rec[0], "loss": 1.0}, rec[1]], 4)  # 1.0 → 1.5
    with pytest.raises(AssertionError, match="non-finite"):
        gpu_check_pipeline.check_training([rec[0], {**rec[1], "loss": float("nan")}], 4)
    with pytest.raises(AssertionError, match="stopped at step 4"):
        gpu_check_pipeline.check_training(rec, 6)
    rows = {"cosine": {"all": 0.6}, "ensemble": {"all": 0.55}, "TailCalibX-style (empirical centres)": {"all": 0.5}}
    assert gpu_check_pipeline.check_report({"classifiers": rows}, 10, 100)["above"] == pytest.approx(0.19)  # .1 + 3·.03
    with pytest.raises(AssertionError, match="chance"):
        gpu_check_pipeline.check_report({"classifiers": {**rows, "ensemble": {"all": 0.18}}}, 10, 100)
    with pytest.raises(AssertionError, match="lacks"):
        gpu_check_pipeline.check_report({"classifiers": {"cosine": {"all": 0.6}, "ensemble": {"all": 0.6}}}, 10, 100)
