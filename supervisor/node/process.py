"""Start torchrun in its own session and make sure nothing it started outlives us.

torchrun puts each worker in a session of its own, so killing torchrun's group
misses them. The wrapper therefore (1) makes itself a child subreaper, so workers
orphaned by a dying torchrun are re-parented to it and stay findable, (2) asks the
kernel to SIGTERM torchrun if the wrapper dies (torchrun then stops its workers),
and (3) on every exit path kills all of its descendants, found with psutil.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys

import psutil

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


# Resolved once, before any fork: the child between fork and exec must not dlopen.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _prctl(option: int, value: int) -> None:
    if _LIBC is not None:
        _LIBC.prctl(option, value, 0, 0, 0)


def become_subreaper() -> None:
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to this child when the wrapper dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


WRAPPER_NICENESS = 10  # the ranks' CPU comes first: the wrapper only watches and records


def yield_cpu() -> None:
    """Lower this process's CPU priority once torchrun is on its way: its own store
    round trips and polling then wait for the ranks' imports and steps, not the
    other way round (on a node with few cores they compete). Children started
    later inherit it; the ranks, already started, keep theirs."""
    try:
        os.nice(WRAPPER_NICENESS)
    except OSError as err:
        log.debug("niceness not changed: %s", err)


def background_child() -> None:
    """preexec_fn of a helper that must not slow the ranks (TorchTitan's argument
    check): dies with the wrapper, runs at the wrapper's lower priority."""
    die_with_parent()
    os.nice(WRAPPER_NICENESS)


def start(argv: list[str], env: dict[str, str], cwd: str | None = None, stdin=None) -> subprocess.Popen:
    """torchrun in a new session (a signal to our group does not reach it; we decide)."""
    return subprocess.Popen(argv, env=env, cwd=cwd, stdin=stdin, start_new_session=True, preexec_fn=die_with_parent)


def descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def kill_all(grace_s: float = 5.0) -> list[int]:
    """SIGTERM every descendant, SIGKILL what is left after `grace_s` (0: SIGKILL at once);
    repeated until none is left, so children forked meanwhile die too. Returns the pids."""
    killed: list[int] = []
    for _ in range(5):
        procs = descendants()
        if not procs:
            break
        killed += [p.pid for p in procs]
        sig = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s if grace_s > 0 else 1)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        grace_s = 0  # later rounds catch stragglers; no more patience
    for pid in set(killed):
        try:
            os.waitpid(pid, os.WNOHANG)  # reap re-parented orphans
        except ChildProcessError:
            pass
    return sorted(set(killed))
