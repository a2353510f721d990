"""Config loading, presets, overrides and validation; bad configs are rejected before submission."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ltdist.config import ConfigError, closest_key, load_config, validate_config, world_size_of
from ltdist.launch import main as launch_main

REPO = Path(__file__).resolve().parents[1]

# (override(s), key the message must name, words the message must contain)
BAD_CONFIGS = [
    (["optim.lrr=0.1"], "optim.lrr", "did you mean 'optim.lr'"),
    (["trainer.epocs=3"], "trainer.epocs", "did you mean 'trainer.epochs'"),
    (["launch.partiton=gpu"], "launch.partiton", "did you mean 'launch.partition'"),
    (["optim.lr=fast"], "optim.lr", "wrong type"),
    (["trainer.batch_size=1.5"], "trainer.batch_size", "wrong type"),
    (["launch.nodes=two"], "launch.nodes", "wrong type"),
    (["optim.lr=0"], "optim.lr", "> 0"),
    (["optim.lr=-0.1"], "optim.lr", "> 0"),
    (["method.kt.tau=0"], "method.kt.tau", "> 0"),
    (["method.mpcl.tau=-1"], "method.mpcl.tau", "> 0"),
    (["method.loss=mpc"], "method.loss", "must be one of"),
    (["method.loss=mpcl", "method.mpcl.meta_inner=head"], "method.mpcl.meta_inner", "identically zero"),
    (["method.kt.ks=[100,20,0]"], "method.kt.ks", "increasing"),
    (["method.kt.ks=[-5,20]"], "method.kt.ks", "non-negative"),
    (["method.kt.ks=[0,20,20]"], "method.kt.ks", "increasing"),
    (["trainer.batch_size=129", "launch.tasks_per_node=2"], "trainer.batch_size", "not divisible"),
    (["trainer.batch_size=64", "launch.tasks_per_node=2", "trainer.grad_accum=3"], "trainer.batch_size",
     "not divisible"),
    (["sampling.power=1.5"], "sampling.power", "[0, 1]"),
    (["optim.momentum=1.0"], "optim.momentum", "[0, 1)"),
    (["model.arch=resnet9000"], "model.arch", "must be one of"),
    (["model.arch=timm:not_installed_lib_check"], "model.arch", "needs the package 'timm'"),
    (["trainer.precision=fp8"], "trainer.precision", "must be one of"),
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage", "must be one of"),
    (["stages=[doctor,trian]"], "stages", "unknown stage 'trian'"),
    (["data.exclude_from_training=rare"], "data.exclude_from_training", "'few'"),
    (["evaluate.few_threshold=200"], "evaluate.few_threshold", "≤ evaluate.many_threshold"),
    (["evaluate.per_class_rows_max=-1"], "evaluate.per_class_rows_max", "≥ 0"),
    (["launch.gpus_per_node=4", "launch.tasks_per_node=2", "trainer.batch_size=64"], "launch.tasks_per_node",
     "one rank per GPU"),
    (["launch.time_min=0"], "launch.time_min", "≥ 1"),
    (["data.imbalance=0.5"], "data.imbalance", "≥ 1"),
    (["method.mpfa.alpha=1.2"], "method.mpfa.alpha", "[0, 1]"),
    (["experiment=my run"], "experiment", "[A-Za-z0-9._-]"),
    (["trainer.epochs"], "trainer.epochs", "key=value"),
]


@pytest.fixture
def sentinel_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` first on PATH that records any call: proof that nothing was submitted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "sbatch-was-called"
    script = bin_dir / "sbatch"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return marker


@pytest.mark.parametrize(("overrides", "key", "words"), BAD_CONFIGS, ids=[c[1] + ":" + c[0][0] for c in BAD_CONFIGS])
def test_bad_config_is_rejected_before_submission(overrides, key, words, tmp_path, sentinel_sbatch, capsys):
    root = tmp_path / "runs"
    code = launch_main(["--cluster", "slurm", f"output.root={root}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{key}:" in err, err
    assert words in err, err
    assert not sentinel_sbatch.exists(), "sbatch was called for an invalid config"
    assert not root.exists(), "a run directory was created for an invalid config"


def test_bad_config_count_meets_the_bar():
    assert len({case[1] for case in BAD_CONFIGS}) >= 15


def test_every_problem_is_reported_at_once():
    cfg = load_config(None, ["optim.lr=-1", "method.kt.tau=0", "trainer.epochs=0"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert {p.split(":")[0] for p in info.value.problems} == {"optim.lr", "method.kt.tau", "trainer.epochs"}


def test_defaults_are_valid_and_overrides_apply():
    cfg = load_config(None, ["optim.lr=0.05", "launch.tasks_per_node=2", "method.kt.ks=[0,10]",
                             "data.exclude_from_training=[7,8,9]", "launch.additional_parameters.exclusive=true"])
    validate_config(cfg)
    assert cfg.optim.lr == 0.05
    assert list(cfg.method.kt.ks) == [0, 10]
    assert list(cfg.data.exclude_from_training) == [7, 8, 9]
    assert cfg.launch.additional_parameters.exclusive is True
    assert world_size_of(cfg) == 2


def test_preset_defaults_compose_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.2\ntrainer:\n  epochs: 7\n")
    (tmp_path / "exp.yaml").write_text("defaults: [base.yaml]\nexperiment: composed\ntrainer:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "exp.yaml", ["trainer.seed=3"])
    validate_config(cfg)
    assert (cfg.experiment, cfg.optim.lr, cfg.trainer.epochs, cfg.trainer.seed) == ("composed", 0.2, 9, 3)


def test_preset_with_unknown_key_names_file_and_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate: unknown key in .*bad.yaml"):
        load_config(tmp_path / "bad.yaml")


def test_missing_and_cyclic_presets_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_renamed_keys_name_their_new_key(tmp_path):
    with pytest.raises(ConfigError, match=r"launch.max_requeues was renamed launch.max_timeouts \(submitit counts "
                                          r"time-outs only.*write launch.max_timeouts"):
        load_config(None, ["launch.max_requeues=2"])
    (tmp_path / "old.yaml").write_text("method:\n  mpfa:\n    group_draws: 8\n")
    with pytest.raises(ConfigError, match=r"method.mpfa.group_draws was renamed method.mpfa.draw_window .*old.yaml"):
        load_config(tmp_path / "old.yaml")
    assert load_config(None, ["launch.max_timeouts=2"]).launch.max_timeouts == 2


def test_closest_key_suggestions():
    assert closest_key("optim.weight_dcay") == "optim.weight_decay"
    assert closest_key("launch.tasks_per_nodes") == "launch.tasks_per_node"
    assert closest_key("zzzzzz.qqqq") is None


# configs/deepspeed/ holds raw DeepSpeed configs, not ltdist presets.
LTDIST_PRESETS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "deepspeed" not in p.parts)


@pytest.mark.parametrize("preset", LTDIST_PRESETS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_presets_load_and_validate(preset):
    cfg = load_config(preset)
    validate_config(cfg)
    assert OmegaConf.to_yaml(cfg)
