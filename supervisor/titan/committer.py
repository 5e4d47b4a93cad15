"""Rank 0's background committer: the commit of a save runs off the training
loop's critical path.

A commit may wait minutes (a cached mount uploading, a store that is slow or
briefly frozen); the training loop must not, and no collective may wait on it,
since TorchTitan lowers its collective timeout to `comm.train_timeout_seconds`
after the first step. So rank 0 hands each completed save to one worker thread,
which commits them in order; the loop only reads the results at step
boundaries. Pure threading, no torch: tested without processes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("supervisor.titan")

MAX_CONSECUTIVE_FAILURES = 2  # then the incarnation ends retryable: training on unsaved helps nobody


@dataclass(frozen=True)
class CommitResult:
    step: int
    ok: bool
    reason: str  # why it failed, or how it succeeded ("committed", "already committed, verifies")
    seconds: float


class Committer:
    """One worker thread that runs `commit(step) -> (ok, reason)` for each submitted step, in order."""

    def __init__(self, commit: Callable[[int], tuple[bool, str]], on_result: Callable[[CommitResult], None] | None = None):
        self._commit = commit
        self._on_result = on_result
        self._queue: deque[int] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self.results: dict[int, CommitResult] = {}
        self.failures: list[CommitResult] = []  # consecutive failures, oldest first

    def submit(self, step: int) -> None:
        with self._cond:
            self._queue.append(step)
            if self._thread is None:
                # daemon: a process that exits with a commit in flight leaves an
                # uncommitted step (atomic marker), never a torn one
                self._thread = threading.Thread(target=self._run, name="supervise-committer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> bool:
        with self._cond:
            return bool(self._queue) or self._busy

    def wait(self, timeout_s: float) -> bool:
        """Until every submitted step has a result (True) or `timeout_s` passed (False)."""
        end = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while self._queue or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def committed(self, step: int) -> bool:
        result = self.results.get(step)
        return bool(result and result.ok)

    def should_stop(self) -> str | None:
        """The reason to end the incarnation, after MAX_CONSECUTIVE_FAILURES failed commits."""
        if len(self.failures) < MAX_CONSECUTIVE_FAILURES:
            return None
        detail = "; ".join(f"step {r.step}: {r.reason}" for r in self.failures)
        return f"{len(self.failures)} consecutive checkpoint commits failed ({detail}); nothing newer can be resumed"

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                step = self._queue.popleft()
                self._busy = True
            begin = time.monotonic()
            try:
                ok, reason = self._commit(step)
            except Exception as err:  # noqa: BLE001 - reported as a failed commit, never lost
                ok, reason = False, f"{type(err).__name__}: {err}"
            result = CommitResult(step, ok, reason, time.monotonic() - begin)
            with self._cond:
                self.results[step] = result
                self.failures = [] if ok else [*self.failures, result]
            if self._on_result is not None:
                try:
                    self._on_result(result)
                except Exception:  # noqa: BLE001
                    log.exception("supervise: commit result handler failed")
            with self._cond:
                self._busy = False
                self._cond.notify_all()
