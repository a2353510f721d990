"""Checkpoints on a nearly full filesystem (a small tmpfs, so root only): pruning makes room with at most one
checkpoint beyond those kept, and a save that cannot fit says so and leaves the older checkpoints intact."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_engine_epochs import COUNTS, MemoryStream, plan_and_objective

from ltdist.config.load import load_config
from ltdist.engine import checkpoint as ckpt
from ltdist.engine.trainer import Trainer


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def test_a_full_disk_prunes_first_then_refuses_by_name_keeping_older_checkpoints(tmpfs, env):
    cfg = load_config(None, ["model.arch=resnet8", "trainer.batch_size=16", "trainer.epochs=2", "trainer.max_steps=8",
                             "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2", "trainer.log_every=100",
                             "optim.warmup_epochs=0", "data.channels=1", "trainer.progress=false"])
    root = tmpfs / "checkpoints"
    seen = set()

    def on_batch(step, batch):
        if step in seen:
            return
        seen.add(step)
        if step == 3:  # after the save at step 2: room for one more checkpoint, not two
            (_, marker), = ckpt._committed(root)
            _resize(tmpfs, shutil.disk_usage(tmpfs).used + int(1.6 * ckpt._size_of(marker)))
        if step == 7:  # after the save at step 6: fill the disk
            with open(tmpfs / "ballast", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass

    trainer = Trainer(cfg, tmpfs, env, MemoryStream(batch=16), len(COUNTS), COUNTS, None, lambda r: None,
                      **plan_and_objective(cfg, env), on_batch=on_batch, keep_checkpoints=2)
    with pytest.raises(ckpt.CheckpointSpaceError) as refused:
        trainer.fit()
    message = str(refused.value)
    assert message.startswith(f"no space left on device: {root}, ") and "free, checkpoint needs ~" in message
    assert trainer.step == 8
    # step 6 fitted because step 2 (beyond keep - 1 = 1) was removed before writing; step 8 could not fit
    assert sorted(p.name for p in root.glob("step_*")) == [ckpt.tag_for(4), ckpt.tag_for(6)]
    assert all(ckpt.verify(d)[0] is not None for d in root.glob("step_*"))
