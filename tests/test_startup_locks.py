"""A rank killed during initialisation must not stop the next run: torch's extension lock and the watchdog.

torch.utils.cpp_extension takes ``<TORCH_EXTENSIONS_DIR>/<op>/lock`` each time DeepSpeed loads its CPU
comm op, built or not; a process killed while holding it used to make every later run wait forever.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from data_fixtures import write_imagefolder

from ltdist.data.build import build_shards
from ltdist.watchdog import watchdog

# One train-stage run as its own process, on one rank. With "die-holding-the-lock" the process SIGKILLs
# itself right after torch's FileBaton takes the extension lock inside deepspeed.initialize; with
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
    src = write_imagefolder(tmp_path / "tree", {"train": [40, 20, 10, 6], "test": [2, 2, 2, 2]})
    shards = build_shards("imagefolder", str(src), tmp_path / "shards", val_per_class=2, shard_size=32,
                          progress=False).parent
    cache = tmp_path / "user-cache"  # the shared TORCH_EXTENSIONS_DIR (a home directory on every node)

    old = _run("die-holding-the-lock-unisolated", shards, tmp_path / "run0", cache)
    assert old.returncode == -9, old.stdout[-2000:] + old.stderr[-2000:]
    assert (cache / "deepspeed_shm_comm" / "lock").is_file()  # what used to hang every later run

    killed = _run("die-holding-the-lock", shards, tmp_path / "run1", cache)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    (held,) = [line.split()[-1] for line in killed.stdout.splitlines() if line.startswith("killed holding")]
    assert Path(held).is_file() and not Path(held).is_relative_to(cache)  # its own directory, not the shared one

    started = time.monotonic()
    nxt = _run("normal", shards, tmp_path / "run2", cache, timeout_s=240)
    assert nxt.returncode == 0 and "run finished" in nxt.stdout, nxt.stdout[-3000:] + nxt.stderr[-3000:]
    assert time.monotonic() - started < 240
    assert not Path(held).exists()  # the dead process's directory was pruned
    assert (tmp_path / "run2" / "weights" / "final.pt").is_file()


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
