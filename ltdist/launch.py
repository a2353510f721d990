"""Submit an ltdist job through submitit: ``python -m ltdist.launch --cluster {local,slurm} [key=value ...]``.

The config is loaded and validated here, before anything is submitted; the run directory
``<output.root>/<experiment>/<run_id>/`` gets the resolved ``config.yaml`` and the submitit logs
(``logs/``). Before submitting, the launcher takes the run directory's lock (:mod:`ltdist.runlock`: a
second launch into a run in use is refused, naming the holder) and, when the run has checkpoints,
refuses a resume whose training settings differ from them (:mod:`ltdist.engine.fingerprint`) or whose
checkpoints all fail verification; ``config.yaml`` is written only after these checks. A local job runs
in processes on this machine and is always followed to its end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ltdist.config import ConfigError, config_to_yaml, load_config, validate_config

# States after which a Slurm job will not run again (a requeued job goes back to PENDING instead).
_SLURM_FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                       "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ltdist launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m ltdist.launch --cluster slurm --config configs/experiment/fmnist_lt.yaml "
               "launch.partition=gpu launch.nodes=2 launch.tasks_per_node=8 launch.gpus_per_node=8 trainer.epochs=90")
    parser.add_argument("--cluster", choices=("local", "slurm"), default="local",
                        help="local: processes on this machine; slurm: sbatch through submitit (default: local)")
    parser.add_argument("--config",
                        help="YAML preset merged over the defaults (e.g. configs/experiment/fmnist_lt.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the sbatch script; submit nothing")
    parser.add_argument("--wait", action="store_true",
                        help="follow rank 0's log until the job ends; exit with its status")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")
    return parser.parse_args(argv)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``<output.root>/<experiment>/<run_id>``; fills ``output.run_id`` with a timestamp when empty."""
    if not cfg.output.run_id:
        cfg.output.run_id = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root).absolute() / cfg.experiment / cfg.output.run_id


def build_executor(cluster: str, cfg: DictConfig, log_dir: Path):
    """A submitit executor whose parameters come from ``cfg.launch``."""
    import submitit

    launch = cfg.launch
    executor = submitit.AutoExecutor(folder=log_dir, cluster=cluster, slurm_max_num_timeout=launch.max_timeouts)
    common = dict(name=launch.job_name, timeout_min=launch.time_min, tasks_per_node=launch.tasks_per_node,
                  stderr_to_stdout=True)
    if launch.gpus_per_node:
        common["gpus_per_node"] = launch.gpus_per_node
    if cluster == "local":
        executor.update_parameters(**common)
        return executor
    slurm = dict(nodes=launch.nodes, cpus_per_task=launch.cpus_per_task, mem_gb=launch.mem_gb,
                 slurm_additional_parameters=OmegaConf.to_container(launch.additional_parameters, resolve=True))
    for key in ("partition", "account", "qos", "constraint"):
        if launch[key]:
            slurm[f"slurm_{key}"] = launch[key]
    executor.update_parameters(**common, **slurm)
    return executor


def sbatch_script(executor) -> str:
    """The sbatch file submitit would submit (without submitting it)."""
    return executor._executor._make_submission_file_text(executor._executor._submitit_command_str, "dry-run")


def derived_settings(cfg: DictConfig, cluster: str) -> str:
    """What the trainer will derive from the config on ``cluster``: ranks, per-rank micro-batch, effective
    learning rate, DeepSpeed's batch / ZeRO / precision keys, and steps per epoch when the shards exist."""
    from ltdist.engine.ds_config import build_deepspeed_config, effective_lr, plan_batches

    t, o = cfg.trainer, cfg.optim
    nodes = cfg.launch.nodes if cluster == "slurm" else 1
    world = nodes * cfg.launch.tasks_per_node
    plan = plan_batches(t.batch_size, world, t.grad_accum)
    lr = effective_lr(o.lr, plan.global_batch, o.lr_reference_batch, o.lr_scaling)
    ds = build_deepspeed_config(plan, t.precision, cfg.deepspeed.zero_stage, o.grad_clip,
                                OmegaConf.to_container(cfg.deepspeed.extra, resolve=True))
    lines = [f"ranks: {nodes} node(s) × {cfg.launch.tasks_per_node} = {world}"
             + (f" ({cfg.launch.gpus_per_node} GPUs per node)" if cfg.launch.gpus_per_node else ""),
             f"batch: {plan.global_batch} global = {plan.micro_batch} per rank × {world} ranks × "
             f"{plan.grad_accum} accumulation step(s)",
             f"learning rate: {lr:g} = {o.lr:g} at batch {o.lr_reference_batch}, {o.lr_scaling} scaling to "
             f"{plan.global_batch}; {o.schedule} schedule, {o.warmup_epochs:g} warm-up epoch(s)",
             "deepspeed: " + ", ".join(f"{k}={ds[k]}" for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                              "gradient_accumulation_steps", "zero_optimization"))
             + f", precision {t.precision}"]
    index_path = Path(cfg.data.shards) / "index.json"
    if index_path.is_file():
        from ltdist.data import read_index

        index = read_index(index_path)
        steps = sum(index.train_counts) // plan.global_batch
        total = steps * t.epochs
        capped = f", stopped at trainer.max_steps={t.max_steps}" if 0 < t.max_steps < total else ""
        lines.append(f"data: {index.num_classes} classes, {sum(index.train_counts)} train images → {steps} steps "
                     f"per epoch, {total} in {t.epochs} epoch(s){capped}")
    else:
        lines.append(f"data: {index_path} not found here (steps per epoch are counted from it at run time)")
    return "\n".join(f"# {line}" for line in lines)


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    text = config_to_yaml(cfg)
    if path.exists() and path.read_text() != text:
        # Re-launching into an existing run with other values: keep what the earlier job ran with.
        previous = run_dir / f"config.previous-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        path.rename(previous)
        print(f"note: {path} differed from this launch's config; the old one is kept as {previous.name}")
    path.write_text(text)


def slurm_job_state(job_id: str) -> str | None:
    """JobState from ``scontrol show job`` (works without an accounting daemon); None once Slurm forgot it."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def follow_job(job, cluster: str, poll_s: float = 1.0) -> int:
    """Print rank 0's log as it grows until the job ends; return 0 on success, 1 otherwise."""
    log_path = Path(job.paths.stdout)
    offset = 0
    final_state = None
    while True:
        if log_path.exists():
            with open(log_path, errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            if chunk:
                print(chunk, end="", flush=True)
        if final_state is not None:
            break
        if job.paths.result_pickle.exists():
            final_state = "FINISHED"
        elif cluster == "slurm":
            state = slurm_job_state(str(job.job_id))
            if state is None or state in _SLURM_FINAL_STATES:
                final_state = state or "GONE"
        elif job.done():
            final_state = "FINISHED"
        time.sleep(poll_s if final_state is None else 0.5)  # one more read of the log after the end
    if not job.paths.result_pickle.exists():
        verdict = "was preempted" if final_state == "PREEMPTED" else f"was killed or failed ({final_state})"
        print(f"\njob {job.job_id} {verdict} without a result; {_failing_rank_note(job)}", file=sys.stderr)
        return 1
    try:
        job.results()
    except Exception as exc:  # the job's own exception, re-raised by submitit with its traceback text
        print(f"\njob {job.job_id} failed:\n{exc}\n{_failing_rank_note(job)}", file=sys.stderr)
        return 1
    print(f"\njob {job.job_id} completed")
    return 0


# Errors a rank raises because a peer went away: the peer's own log has the cause.
_CONSEQUENTIAL = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")


def _failing_rank_note(job) -> str:
    """Which rank failed, as far as the ranks' logs (stdout and stderr) tell: the first with an error of its
    own (a traceback that is not a lost connection to a peer, or the stall watchdog's line); else a rank
    that logged no error while its peers lost their connection to it (killed from outside, out of memory).
    The log's last lines are shown when it is not rank 0's."""
    own, lost, silent = [], [], []
    for rank in range(job.num_tasks):
        paths = job.task(rank).paths
        text = "".join(Path(p).read_text(errors="replace") for p in (paths.stdout, paths.stderr) if Path(p).exists())
        entry = (rank, paths.stdout, text)
        if "no training progress for" in text:
            own.append(entry)
        elif "Traceback (most recent call last)" in text:
            (lost if any(marker in text for marker in _CONSEQUENTIAL) else own).append(entry)
        else:
            silent.append(entry)
    if own or not (lost and silent):
        if not (own or lost):
            return f"no rank logged an error (killed from outside?); rank 0's log: {job.paths.stdout}"
        rank, path, text = (own or lost)[0]
        what = f"rank {rank} failed, see its log: {path}"
    else:
        rank, path, text = silent[0]
        what = (f"rank {rank} ended without logging an error while rank {lost[0][0]} lost its connection to it "
                f"(killed from outside, or out of memory?), see its log: {path}")
    return what + ("" if rank == 0 else "\n" + "\n".join(text.rstrip().splitlines()[-15:]))


def _data_problems(cfg) -> str | None:
    """Config values only the data can check, when the shards exist already (else the train stage checks
    them once rank 0 has built the shards): the message, or None when they fit."""
    index_path = Path(cfg.data.shards) / "index.json"
    if "train" not in cfg.stages or not index_path.is_file():
        return None
    from ltdist.data import read_index
    from ltdist.data.classes import DataConfigError, check_against_data
    from ltdist.stages.kt import val_split_needs

    try:
        check_against_data(cfg, read_index(index_path), val_split_needs(cfg))
    except DataConfigError as exc:
        return str(exc)
    return None


def _resume_problems(cfg: DictConfig, run_dir: Path) -> str | None:
    """When the run has checkpoints and trains again: the message refusing a resume whose training settings
    differ from the newest verified checkpoint's (or whose checkpoints all fail verification), else None."""
    if "train" not in cfg.stages:
        return None
    from ltdist.engine.checkpoint import CheckpointError, find_resumable
    from ltdist.engine.fingerprint import changed_settings, refusal, training_settings

    try:
        found, _ = find_resumable(run_dir / "checkpoints")
    except CheckpointError as exc:
        return None if cfg.trainer.allow_restart_from_scratch else str(exc)
    if found is None:
        return None
    directory, marker = found
    accepted = list(cfg.trainer.accept_changed_keys)
    changes = changed_settings(marker.get("settings", {}), training_settings(cfg), accepted)
    return refusal(str(directory), changes) if changes else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate_config(cfg)
        if args.cluster == "local" and cfg.launch.nodes != 1:
            raise ConfigError([f"launch.nodes: the local executor runs on one node, got {cfg.launch.nodes}"])
    except ConfigError as exc:
        print(f"ltdist launch: {exc}", file=sys.stderr)
        return 2
    from ltdist.models.weights import missing_weights_message

    problems = _data_problems(cfg) or missing_weights_message(cfg.model.weights, cfg.model.arch)
    if problems:
        print(f"ltdist launch: {problems}", file=sys.stderr)
        return 2
    run_dir = resolve_run_dir(cfg)
    log_dir = run_dir / "logs"

    if args.dry_run:
        print("# resolved config")
        print(config_to_yaml(cfg))
        print(f"# run directory: {run_dir}")
        print(derived_settings(cfg, args.cluster))
        if args.cluster == "slurm":
            print("# sbatch script")
            print(sbatch_script(build_executor("slurm", cfg, log_dir)))
        else:
            print(f"# local executor: {cfg.launch.tasks_per_node} process(es) on this machine")
        return 0

    from ltdist import runlock
    from ltdist.job import Job

    token = runlock.new_token()
    try:  # one writer per run: refused here, before anything is submitted or written
        runlock.acquire(run_dir, token, "submitting", slurm_state=slurm_job_state if args.cluster == "slurm" else None)
    except runlock.RunLocked as exc:
        print(f"ltdist launch: {exc}", file=sys.stderr)
        return 2
    problems = _resume_problems(cfg, run_dir)
    if problems:
        runlock.release(run_dir, token)
        print(f"ltdist launch: {problems}", file=sys.stderr)
        return 2
    _write_config(cfg, run_dir)
    executor = build_executor(args.cluster, cfg, log_dir)
    try:
        job = executor.submit(Job(cfg, run_dir, token))
    except Exception as exc:  # sbatch errors arrive as FailedJobError/CalledProcessError with Slurm's text
        runlock.release(run_dir, token)
        print(f"ltdist launch: submission failed: {exc}", file=sys.stderr)
        return 1
    if args.cluster == "slurm":
        runlock.update(run_dir, token, slurm_job_id=str(job.job_id), heartbeat=time.time())
    print(f"job id:        {job.job_id}")
    print(f"run directory: {run_dir}")
    print(f"rank 0 log:    {job.paths.stdout}")
    print(f"all logs:      {log_dir}")
    if args.cluster == "local":  # the job ends with this process: never leave its lock behind
        try:
            return follow_job(job, args.cluster)
        finally:
            runlock.release(run_dir, token)
    if args.wait:
        return follow_job(job, args.cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
