"""Make sure nothing torchrun started outlives us, and keep the wrapper's CPU use
behind the ranks'.

torchrun puts each worker in a session of its own, so killing torchrun's group
misses them. The wrapper therefore (1) makes itself a child subreaper, so workers
orphaned by a dying torchrun are re-parented to it and stay findable, (2) asks the
kernel to SIGTERM torchrun if the wrapper dies (torchrun then stops its workers):
both in supervisor.node.prctl, set where torchrun starts (supervisor.node.early),
and (3) on every exit path kills all of its descendants, found with psutil.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import psutil

from supervisor.node.prctl import die_with_parent

log = logging.getLogger(__name__)

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
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(procs, timeout=grace_s if grace_s > 0 else 1)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        grace_s = 0  # later rounds catch stragglers; no more patience
    for pid in set(killed):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap re-parented orphans
    return sorted(set(killed))
