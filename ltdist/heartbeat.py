"""Progress lines for long loops in logs nobody watches on a terminal (extract, the shard writer).

:class:`Heartbeat` logs a loop's progress with elapsed time and an ETA at most every ``every_s`` seconds,
under the logger ``ltdist.progress`` that the trainer's lines use too (:mod:`ltdist.engine.progress`).
It imports no torch, so the shard writer can use it.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("ltdist.progress")


def format_duration(seconds: float) -> str:
    """``3725`` → ``"1h02m05s"``; ``65`` → ``"1m05s"``; ``9.4`` → ``"9s"``."""
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Heartbeat:
    """Logs ``what``'s progress at most every ``every_s`` seconds: ``tick(done)`` in a loop of ``total``."""

    def __init__(self, what: str, total: int | None = None, every_s: float = 30.0, enabled: bool = True):
        self.what, self.total, self.every_s, self.enabled = what, total, every_s, enabled
        self.started = self._last = time.perf_counter()

    def tick(self, done: int, unit: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self.started
        of = f"/{self.total}" if self.total else ""
        eta = (f" ETA {format_duration(elapsed / done * (self.total - done))}"
               if self.total and done else "")
        log.info("%s: %d%s%s, elapsed %s%s", self.what, done, of, f" {unit}" if unit else "",
                 format_duration(elapsed), eta)
