"""A rank killed during initialisation must not stop the next run: torch's extension lock and the watchdog.

torch.utils.cpp_extension takes ``<TORCH_EXTENSIONS_DIR>/<op>/lock`` each time DeepSpeed loads its CPU
comm op, built or not; a process killed while holding it used to make every later run wait forever.
ltdist now imports the prebuilt op itself, so a run takes no such lock and runs no compiler at all.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_fixtures import write_imagefolder

from ltdist.data.build import build_shards
from ltdist.engine.ds_ops import ensure_prebuilt
from ltdist.watchdog import watchdog

# One train-stage run as its own process, on one rank. With "die-holding-the-lock" the process SIGKILLs
# itself if torch's FileBaton ever takes an extension lock inside deepspeed.initialize; with
# "die-holding-the-lock-unisolated" it does so loading the op straight from TORCH_EXTENSIONS_DIR, as
# ltdist did before (the lock a killed run of that version left in a shared cache).
RUN = r'''
import os, signal, sys
from pathlib import Path
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[1])
mode, shards, run_dir = sys.argv[2], sys.argv[3], Path(sys.argv[4])
if mode.startswith("die"):
    from torch.utils.file_baton import FileBaton
    real = FileBaton.try_acquire
    def acquire_and_die(self):
        got = real(self)
        if got:
            print("killed holding", self.lock_file_path, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return got
    FileBaton.try_acquire = acquire_and_die
if mode == "die-holding-the-lock-unisolated":
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
from ltdist.config.load import load_config
from ltdist.distributed import init_distributed
from ltdist.stages import StageContext
from ltdist.stages.train import build_trainer
env = init_distributed("cpu")
cfg = load_config(None, [f"data.shards={shards}", "data.format=imagefolder", "data.image_size=8", "data.num_workers=0",
                         "model.arch=resnet8", "trainer.batch_size=8", "trainer.max_steps=2", "trainer.progress=false",
                         "evaluate.many_threshold=30", "evaluate.few_threshold=8"])
run_dir.mkdir(parents=True, exist_ok=True)
build_trainer(StageContext(cfg, run_dir, env)).fit()
print("run finished", flush=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, shards: Path, run_dir: Path, cache: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", RUN, str(_free_port()), mode, str(shards), str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def test_a_rank_killed_holding_the_extension_lock_does_not_stop_the_next_run(tmp_path):
    ensure_prebuilt()  # as `make install` does: this test is about runs, not about the one-time build
    src = write_imagefolder(tmp_path / "tree", {"train": [40, 20, 10, 6], "test": [2, 2, 2, 2]})
    shards = build_shards("imagefolder", str(src), tmp_path / "shards", val_per_class=2, shard_size=32,
                          progress=False).parent
    cache = tmp_path / "user-cache"  # the shared TORCH_EXTENSIONS_DIR (a home directory on every node)

    old = _run("die-holding-the-lock-unisolated", shards, tmp_path / "run0", cache)
    assert old.returncode == -9, old.stdout[-2000:] + old.stderr[-2000:]
    assert (cache / "deepspeed_shm_comm" / "lock").is_file()  # what used to hang every later run

    # ltdist's own start takes no extension lock at all: the prebuilt op is imported directly.
    unlocked = _run("die-holding-the-lock", shards, tmp_path / "run1", cache)
    assert unlocked.returncode == 0 and "run finished" in unlocked.stdout, unlocked.stderr[-3000:]
    assert "killed holding" not in unlocked.stdout

    started = time.monotonic()
    nxt = _run("normal", shards, tmp_path / "run2", cache, timeout_s=240)
    assert nxt.returncode == 0 and "run finished" in nxt.stdout, nxt.stdout[-3000:] + nxt.stderr[-3000:]
    assert time.monotonic() - started < 240
    assert (tmp_path / "run2" / "weights" / "final.pt").is_file()


def test_a_dead_process_extension_directory_is_pruned(tmp_path):
    parent = Path(tempfile.gettempdir()) / f"ltdist-torch-extensions-{os.getuid()}"
    parent.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = parent / f"pid{dead.pid}-leftover"
    (left / "deepspeed_shm_comm").mkdir(parents=True)
    (left / "deepspeed_shm_comm" / "lock").touch()  # what a rank killed inside torch's loader leaves
    code = "from ltdist.engine.ds_ops import isolate_torch_extensions; print(isolate_torch_extensions())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not left.exists()


def _failing_tools(bin_dir: Path, marker: Path) -> dict[str, str]:
    """PATH entries named like the tools torch's JIT loader builds with (ninja, then the C++ compiler); each
    records its call and fails. ``gcc`` stays real: DeepSpeed's op-compatibility probe compiles a one-line C
    test program through it in every process, which is not a build of the op."""
    bin_dir.mkdir(parents=True)
    for tool in ("ninja", "c++", "g++"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {marker}\nexit 1\n")
        script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_two_rank_start_runs_no_compiler_and_leaves_the_prebuilt_ops_untouched(tmp_path):
    src = write_imagefolder(tmp_path / "tree", {"train": [40, 20, 10, 6], "test": [2, 2, 2, 2]})
    shards = build_shards("imagefolder", str(src), tmp_path / "shards", val_per_class=2, shard_size=16,
                          progress=False).parent
    prebuilt = ensure_prebuilt()
    before = {p: p.stat().st_mtime_ns for p in prebuilt.rglob("*") if p.is_file()}
    marker = tmp_path / "build-tools-called"
    env = {**os.environ, **_failing_tools(tmp_path / "bin", marker), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ltdist.launch", "--cluster", "local", "launch.tasks_per_node=2", "stages=[train]",
         f"output.root={tmp_path / 'runs'}", "experiment=no-compiler", f"data.shards={shards}",
         "data.format=imagefolder", "data.image_size=8", "data.num_workers=0", "model.arch=resnet8",
         "trainer.batch_size=8", "trainer.max_steps=3", "trainer.progress=false", "evaluate.many_threshold=30",
         "evaluate.few_threshold=8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not marker.exists(), f"a build tool ran: {marker.read_text()}"
    assert {p: p.stat().st_mtime_ns for p in prebuilt.rglob("*") if p.is_file()} == before
    assert list((tmp_path / "runs" / "no-compiler").glob("*/weights/final.pt"))
    print(f"2-rank start to 3 steps done in {elapsed:.1f} s")


def test_the_watchdog_says_what_a_blocked_start_up_waits_for(caplog):
    with caplog.at_level(logging.WARNING, logger="ltdist.watchdog"):
        with watchdog("the lock of the test", first_s=0.05, every_s=0.1, details=lambda: "lock held by pid 42"):
            time.sleep(0.4)
        with watchdog("a quick step", first_s=5.0):
            pass
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) >= 2
    assert all("still waiting after" in m and "the lock of the test" in m and "lock held by pid 42" in m
               and "test_the_watchdog_says_what" in m for m in messages)
    assert not any("a quick step" in m for m in messages)


def test_a_failing_watchdog_detail_does_not_break_the_block(caplog):
    def details() -> str:
        raise OSError("no such directory")

    with caplog.at_level(logging.WARNING, logger="ltdist.watchdog"), \
            watchdog("x", first_s=0.05, every_s=10.0, details=details):
        time.sleep(0.2)
    assert "details failed: no such directory" in caplog.records[0].getMessage()
