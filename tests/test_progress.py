"""Rank 0's progress lines: epoch totals across reset windows, the line's fields, the heartbeat."""

from __future__ import annotations

import logging

from ltdist.engine.metrics import StepWindow
from ltdist.engine.progress import TrainProgress
from ltdist.heartbeat import Heartbeat, format_duration


def _window(loss_sum: float, correct: float, samples: float, wait: float = 0.0) -> StepWindow:
    w = StepWindow()
    w.add(loss_sum, correct, samples)
    w.data_wait_s = wait
    return w


def _record(window: StepWindow, step: int) -> dict:
    return {"step": step, "epoch": 0, "lr": 0.1, **window.summary()}


def test_epoch_totals_count_every_sample_once_across_reset_windows(caplog):
    progress = TrainProgress(total_steps=8, epochs=2, start_step=0, enabled=True)
    with caplog.at_level(logging.INFO, logger="ltdist.progress"):
        first = _window(10.0, 5.0, 10.0)
        progress.log_step(_record(first, 2), first)  # the trainer resets the window after this
        live = _window(4.0, 3.0, 6.0)  # not yet logged at the epoch end
        one = progress.log_epoch(1, 4, live, {"many": 0.9, "medium": 0.5, "few": None, "all": 0.75})
        live.add(2.0, 1.0, 2.0)  # the same window continues into epoch 2, then is logged and reset
        progress.log_step(_record(live, 6), live)
        two = progress.log_epoch(2, 8, StepWindow(), None)
    assert one["loss"] == 14.0 / 16 and one["accuracy"] == 8.0 / 16
    assert two["loss"] == 2.0 / 2 and two["accuracy"] == 1.0 / 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("step 2/8 epoch 1 loss 1.0000 acc 50.0%")
    assert lines[1].startswith("epoch 1/2 done: step 4/8 loss 0.8750 train acc 50.0% "
                               "val many/medium/few/all 90.0/50.0/-/75.0%")
    assert "ETA" in lines[1] and "img/s" in lines[1] and "data-wait" in lines[1]
    assert "val many/medium/few/all none" in lines[3]


def test_other_ranks_stay_silent(caplog):
    progress = TrainProgress(total_steps=4, epochs=1, start_step=0, enabled=False)
    with caplog.at_level(logging.INFO, logger="ltdist.progress"):
        w = _window(1.0, 1.0, 1.0)
        progress.log_step(_record(w, 1), w)
        progress.log_epoch(1, 4, w, None)
    assert not caplog.records


def test_heartbeat_is_rate_limited(caplog):
    beat = Heartbeat("extract test", total=100, every_s=0.0)
    quiet = Heartbeat("never", total=100, every_s=3600.0)
    with caplog.at_level(logging.INFO, logger="ltdist.progress"):
        beat.tick(50, "images")
        quiet.tick(50, "images")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("extract test: 50/100 images, elapsed") and "ETA" in line


def test_format_duration():
    assert [format_duration(s) for s in (9.4, 65, 3725)] == ["9s", "1m05s", "1h02m05s"]
