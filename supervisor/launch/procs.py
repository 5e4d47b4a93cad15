"""Finding and killing every process of a local "node", however deep it hides.

torchrun's workers live in their own sessions, and a SIGKILLed node wrapper
orphans them; process groups alone cannot find them. So every process the
local backend starts carries a tag in its environment (inherited by all
descendants), and the controller is a child subreaper, so that orphans are
re-parented to it instead of init. Linux only, like the rest of the local
backend.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

ENV_TAG = "SUPERVISE_LOCAL_TAG"  # "<job>/<incarnation>/<node rank>"

def tag(job: str, incarnation: int, rank: int) -> str:
    return f"{job}/{incarnation}/{rank}"


def tagged(prefix: str) -> list[psutil.Process]:
    """Live processes of this user whose tag starts with `prefix` (e.g. "job/" or "job/3/1")."""
    found = []
    me = os.getuid()
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != me:
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            value = proc.environ().get(ENV_TAG, "")
        except (psutil.Error, OSError):
            continue
        if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
            found.append(proc)
    return found


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    """Send `sig` to each process and to its process group, all at once (a VM vanishing)."""
    groups = set()
    for proc in procs:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(proc.pid))
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def kill_tagged(prefix: str, *, timeout_s: float = 10.0) -> int:
    """SIGKILL every process tagged `prefix` until none is left; returns how many were seen."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        procs = tagged(prefix)
        if not procs:
            return len(seen)
        seen.update(p.pid for p in procs)
        signal_all(procs, signal.SIGKILL)
        # No psutil.wait_procs: it would reap our own Popen children and hide their codes.
        time.sleep(0.05)
        if time.monotonic() > deadline:
            return len(seen)


def reap_orphans(own: set[int]) -> None:
    """Collect exit statuses of adopted orphans (not of our own Popen children)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == 0 or info.si_pid in own:
            return
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            return
