"""Preemption signal handling and the requeue log (in-process; the 2-rank path is in test_engine.py)."""

import os
import signal

import pytest

from ltdist import preemption
from ltdist.engine import requeue_log


@pytest.fixture
def restore_sigusr2():
    before = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, before)
    preemption._state.update(requested=False, submitit_handler=None)


def test_signal_only_sets_the_flag(restore_sigusr2):
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands in for submitit's
    preemption.install_preemption_handler()
    assert not preemption.preemption_requested_locally() and not preemption.preemption_agreed()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption.preemption_requested_locally() and preemption.preemption_agreed()
    assert calls == []  # submitit's handler waits until the state is saved
    preemption.install_preemption_handler()  # installing again keeps the original handler, clears the flag
    assert not preemption.preemption_requested_locally()
    assert callable(preemption._state["submitit_handler"])


def test_requeue_outside_submitit_raises_preempted(restore_sigusr2):
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    preemption.install_preemption_handler()
    with pytest.raises(preemption.Preempted):
        preemption.requeue_and_exit(rank=0)


def test_requeue_runs_submitit_handler_on_rank0(restore_sigusr2):
    calls = []

    def submitit_handler(signum, frame):  # submitit checkpoints, requeues and exits
        calls.append(signum)
        raise SystemExit(-1)

    signal.signal(signal.SIGUSR2, submitit_handler)
    preemption.install_preemption_handler()
    with pytest.raises(SystemExit):
        preemption.requeue_and_exit(rank=0)
    assert calls == [signal.SIGUSR2]


def test_requeue_log_detects_no_progress(tmp_path):
    assert not requeue_log.is_requeue(requeue_log.read_events(tmp_path))
    requeue_log.append_event(tmp_path, "start", 0)
    requeue_log.check_progress(False, 0, 0)  # a first job preempted before its first step may requeue
    requeue_log.append_event(tmp_path, "preempted", 7)
    events = requeue_log.read_events(tmp_path)
    assert [e["event"] for e in events] == ["start", "preempted"] and requeue_log.is_requeue(events)
    requeue_log.check_progress(True, 7, 8)  # the requeued job made a step: fine
    with pytest.raises(requeue_log.NoProgressError, match="no progress"):
        requeue_log.check_progress(True, 7, 7)
