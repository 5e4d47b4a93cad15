"""Hang detection from the ranks' heartbeats ($SUPERVISE_RUN_DIR/heartbeat/rank-R.json).

A hang is no rank advancing its step within `hang_timeout_s`, or no heartbeat
at all within `startup_timeout_s` of the start (model build, checkpoint load and
rendezvous come first). Time is the wrapper's own monotonic clock when it saw a
change, so clocks written by the ranks do not matter.
"""

from __future__ import annotations


class Watchdog:
    def __init__(self, *, hang_timeout_s: float, startup_timeout_s: float, now: float):
        self.hang_timeout_s = hang_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.started = now
        self.last_progress: float | None = None
        self.steps: dict[int, int] = {}

    def observe(self, steps: dict[int, int], now: float) -> str | None:
        """Feed the current heartbeats; returns why it is a hang, or None."""
        if any(step > self.steps.get(rank, -1) for rank, step in steps.items()):
            self.last_progress = now
            self.steps = {**self.steps, **steps}
        if self.last_progress is None:
            if now - self.started > self.startup_timeout_s:
                return f"no rank wrote a heartbeat within {self.startup_timeout_s:g} s of the start"
            return None
        if now - self.last_progress > self.hang_timeout_s:
            where = ", ".join(f"rank {r} at step {s}" for r, s in sorted(self.steps.items()))
            return f"hang: no rank advanced for {self.hang_timeout_s:g} s ({where})"
        return None
