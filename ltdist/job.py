"""The callable that submitit runs on every rank: set up, run the stages, and requeue on preemption."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("ltdist")


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s")
    logging.getLogger("submitit").propagate = False  # it has its own handler; avoid every line twice


def _set_triton_cache(job_id: str) -> Path:
    """A node-local Triton cache per job, so ranks on shared filesystems do not race on compiled kernels."""
    path = Path(tempfile.gettempdir()) / f"ltdist-triton-{os.getuid()}" / (job_id or str(os.getpid()))
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", str(path))
    return path


class Job:
    """One ltdist job: every rank runs ``cfg.stages`` in ``run_dir``.

    submitit pickles this object; on preemption or time limit it calls :meth:`checkpoint`, which returns a
    fresh submission of the same job. Stages resume from what the run directory holds (the train stage
    from its newest verified checkpoint), so the requeued job continues where this one stopped.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path, lock_token: str = ""):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.lock_token = lock_token  # the run directory's lock (ltdist.runlock) taken by the launch

    def __call__(self) -> dict:
        # Imports here keep the launcher light; these run on the compute node.
        from ltdist.distributed import init_distributed, shutdown_distributed
        from ltdist.preemption import install_preemption_handler
        from ltdist.runlock import HeldLock
        from ltdist.stages import StageContext, run_stages
        from ltdist.watchdog import watchdog

        _configure_logging(int(os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBALID", 0))))
        job_id = os.environ.get("SLURM_JOB_ID", os.environ.get("SUBMITIT_LOCAL_JOB_ID", ""))
        _set_triton_cache(job_id)
        install_preemption_handler()
        with watchdog("joining the process group (every rank must reach init_distributed; MASTER_ADDR="
                      f"{os.environ.get('MASTER_ADDR', '?')}, MASTER_PORT={os.environ.get('MASTER_PORT', '?')})"):
            env = init_distributed(self.cfg.trainer.device)
        log.info("job %s: rank %d/%d on %s (%s, %s), run dir %s", job_id, env.rank, env.world_size,
                 env.hostname, env.backend, env.device, self.run_dir)
        lock = None
        if env.is_main and self.lock_token:  # one writer per run: rank 0 holds the lock for the job
            lock = HeldLock(self.run_dir, self.lock_token, os.environ.get("SLURM_JOB_ID", ""))
        requeued = False
        try:
            run_stages(StageContext(cfg=self.cfg, run_dir=self.run_dir, dist=env))
        except SystemExit:  # requeue_and_exit after a preemption: the requeued job takes the lock back
            requeued = True
            raise
        finally:
            if lock is not None:
                lock.close(release_lock=not requeued)
            shutdown_distributed()
        return {"run_dir": str(self.run_dir), "stages": list(self.cfg.stages), "rank": env.rank}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 when the job is preempted or reaches its time limit."""
        import submitit

        log.warning("requeueing job for %s", self.run_dir)
        return submitit.helpers.DelayedSubmission(Job(self.cfg, self.run_dir, self.lock_token))
