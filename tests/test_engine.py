"""The train stage on real Fashion-MNIST-LT shards with real DeepSpeed (gloo), 2 ranks as 2 processes.

Run A trains S steps uninterrupted; the other runs are checked against it: preempted by a real SIGUSR2
inside an epoch and resumed, killed while writing a checkpoint and resumed; plus non-finite losses.
"""

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
from pathlib import Path

import pytest
import torch

STEPS = 12
WORLD = 2
BASE = ["model.arch=resnet8", "trainer.batch_size=32", "trainer.epochs=1", f"trainer.max_steps={STEPS}",
        "trainer.log_every=2", "trainer.checkpoint_every=1000", "optim.lr=0.8", "optim.warmup_epochs=0",
        "data.num_workers=0", "data.shuffle_buffer=300", "trainer.progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_while_writing(tag: str) -> None:
    """Make this process SIGKILL itself halfway through the first file it writes into checkpoint ``tag``."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if tag in str(f):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _rank_main(rank: int, port: int, run_dir: str, overrides: list[str], scenario: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from ltdist.config.load import load_config
    from ltdist.distributed import init_distributed
    from ltdist.engine.checkpoint import CheckpointError, tag_for
    from ltdist.engine.numerics import NonFiniteLossError
    from ltdist.engine.requeue_log import NoProgressError
    from ltdist.preemption import Preempted, install_preemption_handler, request_preemption
    from ltdist.stages import StageContext
    from ltdist.stages.train import build_trainer

    install_preemption_handler()  # as the Job does; outside submitit requeue_and_exit raises Preempted
    logging.basicConfig(level=logging.INFO, filename=Path(out) / f"log_{rank}.txt", force=True)
    env = init_distributed("cpu")
    cfg = load_config(None, overrides)
    keys_path = Path(out) / f"keys_{rank}.jsonl"
    calls = {"n": 0}

    def on_batch(step, batch):
        digest = hashlib.sha1(batch.images.numpy().tobytes()).hexdigest()[:12]  # augmented pixels, not only keys
        with open(keys_path, "a") as f:
            f.write(json.dumps([step, list(batch.keys), digest]) + "\n")
        if rank == 1 and step == scenario.get("signal_at_step"):
            os.kill(os.getpid(), signal.SIGUSR2)  # the real signal submitit forwards before a time limit
        if rank == 1 and step == scenario.get("stop_at_step"):
            os.kill(os.getpid(), signal.SIGSTOP)  # a hung rank: alive, silent, never reaching a collective

    def loss_hook(step, loss):
        calls["n"] += 1
        if rank == 1 and calls["n"] - 1 in scenario.get("nan_calls", ()):
            return loss * float("nan")
        return loss

    if rank == 0 and "kill_at_step" in scenario:
        _die_while_writing(tag_for(scenario["kill_at_step"]))
    trainer = build_trainer(StageContext(cfg, Path(run_dir), env), on_batch=on_batch, loss_hook=loss_hook)
    if scenario.get("preempted_before_start"):
        request_preemption()
    result = {"rank": rank}
    try:
        trainer.fit()
        result["outcome"] = "done"
    except Preempted:
        result["outcome"] = "preempted"
    except NoProgressError as e:
        result.update(outcome="no_progress", message=str(e))
    except CheckpointError as e:
        result.update(outcome="checkpoint_error", message=str(e))
    except NonFiniteLossError as e:
        result.update(outcome="nonfinite", message=str(e), skipped=trainer.guard.skipped)
        if rank == 1:  # poison one rank's weights: no rank may write the checkpoint
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("inf")
        try:
            trainer.save()
        except RuntimeError as refused:
            result["save_refused"] = str(refused)
    result["step"] = trainer.step
    (Path(out) / f"result_{rank}.json").write_text(json.dumps(result))


def launch(run_dir: Path, out: Path, scenario: dict | None = None, extra: list[str] = (),
           timeout_s: float = 150) -> list[dict]:
    """Both ranks as spawned processes; returns each rank's result (or its exit code if it wrote none)."""
    out.mkdir(parents=True, exist_ok=True)
    port, ctx = _free_port(), mp.get_context("spawn")
    args = (port, str(run_dir), [*BASE, f"data.shards={run_dir.parent / 'shards'}", *extra], scenario or {}, str(out))
    procs = [ctx.Process(target=_rank_main, args=(rank, *args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    procs[0].join(timeout_s)
    if procs[0].exitcode not in (0, None):  # rank 0 died: its peer waits in a collective forever (or is stopped)
        procs[1].kill()
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            pytest.fail(f"rank process {p.pid} hung")
    results = []
    for rank, p in enumerate(procs):
        path = out / f"result_{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"outcome": f"exit {p.exitcode}"})
        path.unlink(missing_ok=True)
    return results


def keys_seen(out: Path, rank: int) -> list:
    return [json.loads(line) for line in (out / f"keys_{rank}.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "weights" / "final.pt", weights_only=True)["state_dict"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_a(workdir) -> tuple[Path, Path]:
    run_dir = workdir / "A"
    results = launch(run_dir, workdir / "A_out")
    assert [r["outcome"] for r in results] == ["done", "done"], results
    return run_dir, workdir / "A_out"


def test_short_run_learns_and_writes_metrics(run_a):
    from ltdist.models import load_exported_model

    run_dir, out = run_a
    lines = metrics(run_dir)
    config = next(m for m in lines if m.get("event") == "config")
    assert (config["global_batch"], config["micro_batch"], config["world_size"]) == (32, 16, 2)
    assert config["effective_lr"] == pytest.approx(0.8 * 32 / 256)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == list(range(2, STEPS + 1, 2))
    assert all(m["images_per_s"] > 0 and 0 <= m["data_wait_fraction"] <= 1 and m["skipped_steps"] == 0
               for m in steps)
    assert steps[-1]["loss"] + steps[-2]["loss"] < steps[0]["loss"] + steps[1]["loss"] - 0.5, steps
    val = next(m for m in lines if m.get("event") == "val")
    assert set(val) >= {"val_many", "val_medium", "val_few", "val_all"}
    # the logged validation equals an independent pass of the exported model over the whole val split
    from ltdist.class_groups import class_groups, group_accuracy
    from ltdist.data import iterate_split, read_index

    index = read_index(run_dir.parent / "shards" / "index.json")
    model = load_exported_model(run_dir / "weights" / "final.pt")
    batches = list(iterate_split(index, "val", batch_size=64, rank=0, world_size=1, image_size=28, channels=1))
    with torch.no_grad():
        predictions = torch.cat([model(b.images).argmax(1) for b in batches])
    expected = group_accuracy(predictions, torch.cat([b.labels for b in batches]),
                              class_groups(index.train_counts), index.num_classes)
    assert {k: val[f"val_{k}"] for k in expected} == pytest.approx(expected)
    # the two ranks saw disjoint samples, one micro-batch of 16 per step
    seen = [keys_seen(out, r) for r in range(WORLD)]
    assert all(len(s) == STEPS and all(len(k) == 16 for _, k, _ in s) for s in seen)
    assert model.classifier.weight.shape == (10, 64) and torch.isfinite(model.classifier.scale).all()
    assert (run_dir / "checkpoints" / f"step_{STEPS:09d}" / "commit.json").exists()


def test_preempted_run_resumes_to_identical_keys_and_weights(workdir, run_a):
    run_a_dir, a_out = run_a
    run_dir, out = workdir / "B", workdir / "B_out"
    first = launch(run_dir, out, {"signal_at_step": 4})  # SIGUSR2 on rank 1 only, inside epoch 0
    assert [r["outcome"] for r in first] == ["preempted", "preempted"] and first[0]["step"] == 5, first
    assert (run_dir / "checkpoints" / "step_000000005" / "commit.json").exists()
    # A requeue that is preempted again before completing a step stops instead of looping.
    stuck = launch(run_dir, out, {"preempted_before_start": True})
    assert [r["outcome"] for r in stuck] == ["no_progress"] * 2, stuck
    assert "no progress" in stuck[0]["message"]
    resumed = launch(run_dir, out)
    assert [r["outcome"] for r in resumed] == ["done", "done"], resumed
    for rank in range(WORLD):
        assert keys_seen(out, rank) == keys_seen(a_out, rank)
    a, b = final_weights(run_a_dir), final_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    events = [json.loads(x)["event"] for x in (run_dir / "checkpoints" / "requeue_log.jsonl").read_text().splitlines()]
    assert events == ["start", "preempted", "start", "start"]


def test_kill_during_checkpoint_resumes_from_previous(workdir, run_a):
    run_a_dir, _ = run_a
    run_dir, out = workdir / "K", workdir / "K_out"
    killed = launch(run_dir, out, {"kill_at_step": 6}, ["trainer.checkpoint_every=3"])
    assert killed[0]["outcome"] == f"exit {-signal.SIGKILL}", killed
    partial = run_dir / "checkpoints" / "step_000000006"
    assert partial.is_dir() and not (partial / "commit.json").exists()
    resumed = launch(run_dir, out, extra=["trainer.checkpoint_every=3"])
    assert [r["outcome"] for r in resumed] == ["done", "done"], resumed
    config_lines = [m for m in metrics(run_dir) if m.get("event") == "config"]
    assert [m["resumed_from_step"] for m in config_lines] == [0, 3]
    a, k = final_weights(run_a_dir), final_weights(run_dir)
    assert all(torch.equal(a[name], k[name]) for name in a)


def test_nonfinite_losses_are_skipped_then_stop(workdir):
    run_dir, out = workdir / "N", workdir / "N_out"
    # rank 1 only: micro-step 3 alone, then 7, 8, 9 in a row (= trainer.max_nonfinite_steps)
    # under ZeRO-2 (gradients partitioned over the ranks), the other tests run stage 0
    results = launch(run_dir, out, {"nan_calls": [3, 7, 8, 9]},
                     ["trainer.max_nonfinite_steps=3", "trainer.log_every=1", "deepspeed.zero_stage=2"])
    assert [r["outcome"] for r in results] == ["nonfinite", "nonfinite"], results
    assert all(r["skipped"] == 4 and r["step"] == 6 for r in results), results
    assert "max_nonfinite_steps=3" in results[0]["message"]
    logged = {m["step"]: m["skipped_steps"] for m in metrics(run_dir) if "skipped_steps" in m}
    assert logged == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    assert all("refusing to checkpoint step 6" in r["save_refused"] for r in results)
    assert not (run_dir / "checkpoints" / "step_000000006").exists()


# MPCL (paper 2 stage 1): meta step at every step, meta set carved from train (4 per class).
MPCL = ["method.loss=mpcl", "method.mpcl.warmup_epochs=0", "method.mpcl.meta_source=train",
        "method.mpcl.meta_per_class=4", "method.mpcl.meta_hidden=16", "method.mpcl.momentum=0.9", "trainer.max_steps=8",
        "method.mpcl.meta_optimizer=sgd_normalised", "method.mpcl.meta_lr=0.05", "method.mpcl.meta_init_std=0.01"]


@pytest.fixture(scope="module")
def mpcl_a(workdir) -> tuple[Path, Path]:
    run_dir = workdir / "MA"
    results = launch(run_dir, workdir / "MA_out", extra=MPCL)
    assert [r["outcome"] for r in results] == ["done", "done"], results
    return run_dir, workdir / "MA_out"


def test_mpcl_trains_with_meta_steps_and_never_streams_the_meta_set(mpcl_a):
    run_dir, out = mpcl_a
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert all("loss_pc" in m and m["meta_steps"] == m["step"] for m in steps), steps
    # the normalised meta step moves Θ by exactly meta_lr; a non-zero last layer lets every layer learn. The
    # very first meta step has no prototype yet (ĉ = 0 does not depend on Θ): a zero gradient, no step, so the
    # first 2-step window averages 0.025
    updates = [m["meta_update_norm"] for m in steps]
    assert updates[0] == pytest.approx(0.025, rel=1e-4), steps
    assert all(u == pytest.approx(0.05, rel=1e-4) for u in updates[1:]), steps
    assert all(m["meta_grad_norm/encoder.0.weight"] > 0 and m["centre_shift_mean"] > 0 for m in steps), steps
    meta = json.loads((run_dir / "meta_set.json").read_text())
    assert meta["source"] == "train" and len(meta["keys"]) == sum(meta["per_class"])
    assert meta["per_class"] == [4] * 9 + [3]  # the 6-image class gives half of its images
    streamed = {k for rank in range(WORLD) for _, keys, _ in keys_seen(out, rank) for k in keys}
    assert streamed and not streamed & set(meta["keys"])
    exported = torch.load(run_dir / "weights" / "prototypes.pt", weights_only=True)
    norms = exported["meta_prototypes"].norm(dim=1)
    assert exported["prototypes"].shape == (10, 64) and torch.allclose(norms[norms > 0], torch.ones(1))


def test_mpcl_preempted_run_resumes_to_identical_weights_and_prototypes(workdir, mpcl_a):
    run_a_dir, a_out = mpcl_a
    run_dir, out = workdir / "MB", workdir / "MB_out"
    first = launch(run_dir, out, {"signal_at_step": 4}, MPCL)
    assert [r["outcome"] for r in first] == ["preempted", "preempted"], first
    resumed = launch(run_dir, out, extra=MPCL)
    assert [r["outcome"] for r in resumed] == ["done", "done"], resumed
    for rank in range(WORLD):
        assert keys_seen(out, rank) == keys_seen(a_out, rank)
    a, b = final_weights(run_a_dir), final_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    pa, pb = (torch.load(d / "weights" / "prototypes.pt", weights_only=True) for d in (run_a_dir, run_dir))
    assert torch.equal(pa["prototypes"], pb["prototypes"]) and torch.equal(pa["meta_prototypes"], pb["meta_prototypes"])
    assert torch.equal(pa["updates"], pb["updates"]) and int(pa["updates"].sum()) > 0
