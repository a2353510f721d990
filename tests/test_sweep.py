"""``ltdist sweep``: presets × seeds planned into run dirs, done runs skipped, the comparison written."""

import contextlib
import json
import types
from pathlib import Path

import pytest

from ltdist import sweep
from ltdist.cli import main as cli_main
from ltdist.config import ConfigError
from ltdist.launch import _write_config
from ltdist.sweep import default_presets, main, plan_runs, preset_name, run_stages

PRESET = str(Path(__file__).resolve().parents[1] / "configs" / "experiment" / "fmnist_lt.yaml")


def test_default_presets_are_those_that_set_a_stage1_objective(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiments = tmp_path / "configs" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "base.yaml").write_text("method:\n  loss: ce\n")
    (experiments / "fmnist_lt_ce.yaml").write_text("defaults: [base.yaml]\n")
    (experiments / "fmnist_lt_bs.yaml").write_text("method:\n  loss: balanced_softmax\n")
    (experiments / "fmnist_lt_kt.yaml").write_text("method:\n  name: kt\n")
    assert default_presets() == ["configs/experiment/fmnist_lt_bs.yaml", "configs/experiment/fmnist_lt_ce.yaml"]


def test_plan_names_runs_by_preset_and_seed(tmp_path):
    linear = f"{PRESET}+model.classifier=linear"
    assert preset_name(linear) == "fmnist_lt_model.classifier-linear"
    runs = plan_runs([PRESET, linear], 2, ["crt", "ncm"], ["trainer.max_steps=3"], tmp_path)
    assert [(r.preset, r.seed) for r in runs] == [(PRESET, 0), (PRESET, 1), (linear, 0), (linear, 1)]
    name = "fmnist_lt_model.classifier-linear"
    assert runs[3].run_dir == tmp_path / name / name / "seed1"
    cfg = runs[3].cfg
    assert (cfg.model.classifier, cfg.trainer.seed, cfg.trainer.max_steps) == ("linear", 1, 3)
    assert list(cfg.stages) == ["train", "extract", "kt", "crt", "ncm", "evaluate"]  # the preset's kt stays
    assert run_stages(["doctor", "train", "extract", "mpfa", "evaluate"], ["kt", "mpfa"]) == [
        "doctor", "train", "extract", "mpfa", "kt", "evaluate"]
    assert runs[0].cfg.model.classifier == "cosine"
    with pytest.raises(ConfigError, match="share a name"):
        plan_runs([PRESET, PRESET], 1, ["crt"], [], tmp_path)
    with pytest.raises(ConfigError, match=r"fmnist_lt\.yaml: stages: unknown stage 'nope'"):
        plan_runs([PRESET], 1, ["nope"], [], tmp_path)


def test_done_runs_are_skipped_and_compared(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--presets", PRESET, f"{PRESET}+model.classifier=linear", "--seeds", "2", "--stages", "ncm",
            "--out", str(out)]
    runs = plan_runs([PRESET, f"{PRESET}+model.classifier=linear"], 2, ["ncm"], [], out)
    for i, run in enumerate(runs):
        _write_config(run.cfg, run.run_dir)
        report = {"dataset": "fmnist_lt", "groups": {"many": [0], "medium": [], "few": [1]},
                  "classifiers": {"NCM": {"many": 0.9, "medium": None, "few": 0.1 * i, "all": 0.5}}}
        if i != 3:
            (run.run_dir / "report.json").write_text(json.dumps(report))
    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"sweep directory: {out}" in printed and "3 already have report.json" in printed
    assert f"pending  {PRESET}+model.classifier=linear seed 1: {runs[3].run_dir}" in printed
    assert not (out / "comparison").exists()
    (runs[3].run_dir / "report.json").write_text(json.dumps(report))  # the last run ends: nothing left to run
    assert main(args) == 0
    data = json.loads((out / "comparison" / "comparison.json").read_text())
    assert [(m["stage1"], len(m["seeds"])) for m in data["methods"]] == [("ce (cosine head)", 2),
                                                                          ("ce (linear head)", 2)]
    assert data["methods"][0]["few"]["mean"] == pytest.approx(0.05)


def test_cli_dispatches_sweep_and_compare(tmp_path, capsys):
    assert cli_main(["sweep", "--presets", PRESET, "--seeds", "1", "--out", str(tmp_path), "--dry-run"]) == 0
    assert f"pending  {PRESET} seed 0: {tmp_path / 'fmnist_lt' / 'fmnist_lt' / 'seed0'}" in capsys.readouterr().out
    assert cli_main(["sweep", "--presets", PRESET, "--out", str(tmp_path), "launch.nodes=2"]) == 2
    assert "launch.nodes: the local executor runs on one node" in capsys.readouterr().err
    assert cli_main(["compare", str(tmp_path)]) == 2
    assert "no report.json at or below it" in capsys.readouterr().err


class _FakeExecutor:
    """Records what the sweep asks of submitit; a submitted job 'runs' by writing its report at once."""

    def __init__(self):
        self.parameters, self.batches, self.submitted = {}, 0, []

    def update_parameters(self, **kwargs):
        self.parameters.update(kwargs)

    @contextlib.contextmanager
    def batch(self):
        self.batches += 1
        yield

    def submit(self, job):
        self.submitted.append(job.run_dir)
        report = {"dataset": "fmnist_lt", "groups": {"many": [0], "medium": [], "few": [1]},
                  "classifiers": {"NCM": {"many": 0.5, "medium": None, "few": 0.5, "all": 0.5}}}
        (job.run_dir / "report.json").write_text(json.dumps(report))
        paths = types.SimpleNamespace(stdout=job.run_dir / "log.out")
        return types.SimpleNamespace(job_id=f"7_{len(self.submitted) - 1}", paths=paths)


def test_slurm_runs_are_one_job_array(tmp_path, monkeypatch, capsys):
    executor = _FakeExecutor()
    built = []
    monkeypatch.setattr(sweep, "build_executor", lambda cluster, cfg, folder: built.append((cluster, folder))
                        or executor)
    monkeypatch.setattr(sweep, "follow_job", lambda job, cluster: 0)
    args = ["--presets", PRESET, "--seeds", "3", "--cluster", "slurm", "--stages", "ncm", "--out", str(tmp_path),
            "--array-parallelism", "2", "launch.partition=gpu"]
    assert sweep.main(args) == 0
    assert built == [("slurm", tmp_path / "logs")] and executor.batches == 1
    assert executor.parameters == {"slurm_array_parallelism": 2}
    assert executor.submitted == [tmp_path / "fmnist_lt" / "fmnist_lt" / f"seed{s}" for s in range(3)]
    assert all((d / "config.yaml").is_file() for d in executor.submitted)
    assert "job 7_2: " in capsys.readouterr().out
    assert (tmp_path / "comparison" / "comparison.md").is_file()
    assert sweep.main(args) == 0 and len(executor.submitted) == 3  # resumed: nothing left to submit
