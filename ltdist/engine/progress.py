"""Progress lines in rank 0's log, for runs nobody watches on a terminal (``--wait``, ``tail -f``).

tqdm draws a bar only on a terminal; a job's stdout is a log file. So the trainer also logs a short line
every ``trainer.log_every`` optimizer steps and a full line at each epoch end: loss and accuracy of the
epoch, validation accuracy by group, throughput, the fraction of time spent waiting for data, elapsed
time and an ETA. :class:`ltdist.heartbeat.Heartbeat` does the same for the other long loops (extract, the
shard writer).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ltdist.heartbeat import format_duration

if TYPE_CHECKING:  # annotations only
    from ltdist.engine.metrics import StepWindow

log = logging.getLogger("ltdist.progress")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


class TrainProgress:
    """Rank 0's progress lines for one :meth:`ltdist.engine.trainer.Trainer.fit` call.

    The trainer's :class:`StepWindow` is reset at every log line; :meth:`log_step` adds its sums here
    before the reset, so epoch totals are what has been absorbed plus what the live window holds.
    """

    def __init__(self, total_steps: int, epochs: int, start_step: int, enabled: bool):
        self.total_steps, self.epochs, self.start_step, self.enabled = total_steps, epochs, start_step, enabled
        self.started = time.perf_counter()
        self._absorbed = [0.0, 0.0, 0.0, 0.0]  # loss·n, correct, n, data wait (s) of reset windows
        self._epoch_base = [0.0, 0.0, 0.0, 0.0]
        self._epoch_started = self.started

    @staticmethod
    def _sums(window: StepWindow) -> list[float]:
        return [window.loss_sum, window.correct, window.samples, window.data_wait_s]

    def _totals(self, window: StepWindow) -> list[float]:
        return [a + w for a, w in zip(self._absorbed, self._sums(window))]

    def _timing(self, step: int) -> str:
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        return f"elapsed {format_duration(elapsed)} ETA {format_duration(eta) if done > 0 else '?'}"

    def log_step(self, record: dict, window: StepWindow) -> None:
        """The short line for a metrics.jsonl train record; call before ``window.reset()``."""
        self._absorbed = self._totals(window)
        if self.enabled:
            log.info("step %d/%d epoch %d loss %.4f acc %s%% lr %.4g %.0f img/s data-wait %.0f%% %s",
                     record["step"], self.total_steps, record["epoch"] + 1, record["loss"],
                     _percent(record["accuracy"]), record["lr"], record["images_per_s"],
                     100 * record["data_wait_fraction"], self._timing(record["step"]))

    def log_epoch(self, epoch: int, step: int, window: StepWindow, val: dict | None,
                  data_skips: dict[str, int] | None = None) -> dict:
        """The epoch-end line (``epoch`` counts from 1, ``val`` as from :func:`ltdist.engine.metrics.validate`
        or None, ``data_skips`` the samples skipped so far by reason); returns the epoch's train summary and
        starts the next epoch's totals."""
        now = time.perf_counter()
        totals = self._totals(window)
        loss_sum, correct, samples, wait = (t - b for t, b in zip(totals, self._epoch_base))
        wall = max(now - self._epoch_started, 1e-9)
        summary = {"loss": loss_sum / max(samples, 1.0), "accuracy": correct / max(samples, 1.0),
                   "images_per_s": samples / wall, "data_wait_fraction": min(wait / wall, 1.0)}
        self._epoch_base, self._epoch_started = totals, now
        if self.enabled:
            groups = "/".join(_percent(val.get(g)) for g in ("many", "medium", "few", "all")) if val else "none"
            skips = sum((data_skips or {}).values())
            reasons = ", ".join(f"{r} {n}" for r, n in sorted((data_skips or {}).items()) if n)
            log.info("epoch %d/%d done: step %d/%d loss %.4f train acc %s%% val many/medium/few/all %s%% "
                     "%.0f img/s data-wait %.0f%% data skips %d%s %s", epoch, self.epochs, step, self.total_steps,
                     summary["loss"], _percent(summary["accuracy"]), groups, summary["images_per_s"],
                     100 * summary["data_wait_fraction"], skips, f" ({reasons})" if reasons else "", self._timing(step))
        return summary
