"""Checkpoints verified by content and loaded safely, on real 2-rank DeepSpeed (gloo) runs.

Run P is preempted at step 5 with checkpoints at steps 3, 4 and 5. Copies of it are damaged the ways
an operator found on a shared cluster: same-size corruption, a flipped header, everything broken, a
planted pickle payload; plus a rank stopped with SIGSTOP. Runs use test_engine.py's 2-rank launcher.
"""

import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
import test_engine as runs
import torch

from ltdist.engine import checkpoint as ckpt

CKPT = ["trainer.checkpoint_every=1", "trainer.keep_checkpoints=3"]


def _tag(step: int) -> str:
    return ckpt.tag_for(step)


def _rehash(directory: Path) -> None:
    """Fix commit.json's sizes and hashes after a file was replaced (what an attacker would do)."""
    marker = json.loads((directory / ckpt.COMMIT_FILE).read_text())
    for name in marker["files"]:
        path = directory / name
        marker["files"][name] = {"size": path.stat().st_size, "sha256": ckpt.sha256_file(path)}
    (directory / ckpt.COMMIT_FILE).write_text(json.dumps(marker))


class Payload:
    """Unpickling this runs ``touch <marker>``: what a planted file does to an unsafe loader."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a torch file whose unpickling would create ``marker``."""
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)


@pytest.fixture(scope="module")
def preempted(workdir) -> Path:
    """A run preempted at step 5, with committed checkpoints at steps 3, 4 and 5."""
    run_dir = workdir / "P"
    results = runs.launch(run_dir, workdir / "P_out", {"signal_at_step": 4}, CKPT)
    assert [r["outcome"] for r in results] == ["preempted", "preempted"], results
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [_tag(3), _tag(4), _tag(5)]
    return run_dir


@pytest.fixture(scope="module")
def restarted(workdir, preempted) -> Path:
    """Every checkpoint of a copy of P damaged; trainer.allow_restart_from_scratch=true trains from step 0."""
    run_dir = workdir / "R"
    shutil.copytree(preempted, run_dir)
    for step in (3, 4, 5):
        path = run_dir / "checkpoints" / _tag(step) / "ltdist_rank0.pt"
        path.write_bytes(path.read_bytes()[:-10])
    results = runs.launch(run_dir, workdir / "R_out", extra=[*CKPT, "trainer.allow_restart_from_scratch=true"])
    assert [r["outcome"] for r in results] == ["done", "done"], results
    return run_dir


def _copy(preempted: Path, run_dir: Path) -> Path:
    shutil.copytree(preempted, run_dir)
    return run_dir / "checkpoints"


def test_same_size_and_header_corruption_fall_back_to_an_intact_checkpoint(workdir, preempted, restarted):
    root = _copy(preempted, workdir / "C")
    newest = root / _tag(5) / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(255 - b for b in data[middle:middle + 4096])  # same size
    newest.write_bytes(bytes(data))
    older = root / _tag(4) / "mp_rank_00_model_states.pt"
    data = bytearray(older.read_bytes())
    data[:64] = bytes(255 - b for b in data[:64])  # the header: unpickling would fail
    older.write_bytes(bytes(data))

    results = runs.launch(workdir / "C", workdir / "C_out", extra=CKPT)
    assert [r["outcome"] for r in results] == ["done", "done"], results
    log = (workdir / "C_out" / "log_0.txt").read_text()
    assert f"rejected checkpoint {_tag(5)}: {newest}: SHA-256 differs" in log
    assert f"rejected checkpoint {_tag(4)}: {older}: SHA-256 differs" in log
    config_lines = [m for m in runs.metrics(workdir / "C") if m.get("event") == "config"]
    assert [m["resumed_from_step"] for m in config_lines] == [0, 3]
    # the run continued from step 3 exactly: bit-identical to the run that trained from step 0
    a, c = runs.final_weights(restarted), runs.final_weights(workdir / "C")
    assert all(torch.equal(a[k], c[k]) for k in a), [k for k in a if not torch.equal(a[k], c[k])]
    assert sorted(p.name[:14] for p in (root / "rejected").iterdir()) == [_tag(4), _tag(5)]  # kept, set aside


def test_all_checkpoints_damaged_is_refused_before_submit_and_restart_is_opt_in(workdir, preempted, restarted,
                                                                                 capsys):
    from ltdist.launch import main as launch_main

    root = _copy(preempted, workdir / "exp" / "bad")
    for step in (3, 4, 5):
        (root / _tag(step) / ckpt.COMMIT_FILE).unlink() if step == 3 else \
            (root / _tag(step) / "ltdist_rank1.pt").write_bytes(b"")
    code = launch_main(["--cluster", "local", f"output.root={workdir}", "experiment=exp", "output.run_id=bad",
                        f"data.shards={workdir / 'shards'}", *runs.BASE, "launch.tasks_per_node=2", *CKPT])
    err = capsys.readouterr().err
    assert code == 2 and "trainer.allow_restart_from_scratch=true" in err, err
    assert f"{_tag(5)}: {root / _tag(5) / 'ltdist_rank1.pt'} has 0 bytes" in err and "commit.json is missing" in err
    assert not (workdir / "exp" / "bad" / "logs").exists()  # nothing was submitted
    # with the key set, the run trained from step 0 (the fixture) and set the damaged ones aside
    config_lines = [m for m in runs.metrics(restarted) if m.get("event") == "config"]
    assert [m["resumed_from_step"] for m in config_lines] == [0, 0]
    assert len(list((restarted / "checkpoints" / "rejected").iterdir())) == 3


def test_a_planted_pickle_payload_in_a_checkpoint_does_not_run(workdir, preempted):
    root = _copy(preempted, workdir / "X")
    marker = workdir / "X_pwned"
    plant(root / _tag(5) / "mp_rank_00_model_states.pt", marker)
    _rehash(root / _tag(5))  # sizes and hashes fixed: verification passes, safe loading must refuse
    results = runs.launch(workdir / "X", workdir / "X_out", extra=CKPT)
    assert [r["outcome"] for r in results] == ["checkpoint_error"] * 2, results
    assert "mp_rank_00_model_states.pt: refused to unpickle" in results[0]["message"]
    assert not marker.exists()
    # ltdist's own per-rank file is refused the same way
    plant(root / _tag(4) / "ltdist_rank0.pt", marker)
    with pytest.raises(ckpt.CheckpointError, match=r"ltdist_rank0\.pt: refused to unpickle"):
        ckpt.safe_load(root / _tag(4) / "ltdist_rank0.pt")
    assert not marker.exists()


def test_weights_features_and_classifier_files_refuse_a_payload(tmp_path):
    from ltdist.methods.classifier_set import load_classifier_sets
    from ltdist.models import load_exported_model
    from ltdist.rundir import features_path, load_features

    marker = tmp_path / "pwned"
    plant(tmp_path / "final.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        load_exported_model(tmp_path / "final.pt")
    path = features_path(tmp_path, "train")
    path.parent.mkdir(parents=True)
    plant(path, marker)
    with pytest.raises(pickle.UnpicklingError):
        load_features(tmp_path, "train")
    (tmp_path / "classifiers").mkdir()
    plant(tmp_path / "classifiers" / "crt.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        load_classifier_sets(tmp_path)
    assert not marker.exists()


def test_the_cifar_importer_unpickles_only_array_batches(tmp_path):
    from ltdist.data.formats import cifar

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    marker = tmp_path / "pwned"
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"], b"x": Payload(marker)}, f)
    with pytest.raises(ValueError, match=r"batches\.meta: CIFAR file refers to posix\.system"):
        cifar.load(str(root), profile="exp", imbalance=10, val_per_class=0, seed=0)
    assert not marker.exists()


def test_a_stopped_rank_fails_the_job_within_the_stall_timeout(workdir):
    started = time.monotonic()
    results = runs.launch(workdir / "S", workdir / "S_out", {"stop_at_step": 3},
                          ["trainer.stall_timeout_s=6"], timeout_s=90)
    took = time.monotonic() - started
    assert results[0]["outcome"] == "exit 3" and results[1]["outcome"] == f"exit {-signal.SIGKILL}", results
    log = (workdir / "S_out" / "log_0.txt").read_text()
    assert "rank 0: no training progress for" in log and "trainer.stall_timeout_s=6" in log
    assert "rank 1 (" in log and "STOPPED OR DEAD" in log and "at step 3" in log
    assert took < 80, took


def test_a_resume_with_changed_settings_is_refused_by_key_before_submit(workdir, preempted, capsys):
    from ltdist.config import load_config
    from ltdist.launch import _resume_problems
    from ltdist.launch import main as launch_main

    run_dir = workdir / "exp" / "changed"
    _copy(preempted, run_dir)
    (run_dir / "config.yaml").write_text("the config the run was launched with\n")
    same = [f"output.root={workdir}", "experiment=exp", "output.run_id=changed", f"data.shards={workdir / 'shards'}",
            *runs.BASE, "launch.tasks_per_node=2", *CKPT]
    code = launch_main(["--cluster", "local", *same, "trainer.batch_size=64", "sampling.power=0.3"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "trainer.batch_size: 32 → 64" in err and "sampling.power: 0.5 → 0.3" in err
    assert "trainer.accept_changed_keys=[sampling.power,trainer.batch_size]" in err
    assert (run_dir / "config.yaml").read_text() == "the config the run was launched with\n"
    assert not (run_dir / "logs").exists() and not (run_dir / "run.lock").exists()
    # extending the run is meaningful, and an explicit opt-in accepts the rest
    assert _resume_problems(load_config(None, [*same, "trainer.epochs=3", "trainer.max_steps=40"]), run_dir) is None
    accepted = load_config(None, [*same, "optim.lr=0.4", "trainer.accept_changed_keys=[optim.lr]"])
    assert _resume_problems(accepted, run_dir) is None
    arch = _resume_problems(load_config(None, [*same, "model.arch=resnet20"]), run_dir)
    assert 'model.arch: "resnet8" → "resnet20"' in arch
    assert "world_size (launch.nodes × launch.tasks_per_node): 2 → 4" in _resume_problems(
        load_config(None, [*same, "launch.tasks_per_node=4"]), run_dir)
