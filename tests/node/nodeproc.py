"""Run `supervise node` as a real process in tests, and find every process it left.

Each run carries a unique tag in its environment; every descendant inherits it,
even one re-parented elsewhere, so `survivors(tag)` finds leftovers by scanning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
TAG = "SUPERVISE_TEST_NODE_TAG"


def run_node(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`supervise node ARGS` to completion (dry runs, argument errors), without the SkyPilot
    variables of this shell unless `env` sets them."""
    full = {**os.environ, **(env or {})}
    for k in ("SKYPILOT_NUM_NODES", "SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SUPERVISE_CHECKPOINTS"):
        if k not in (env or {}):
            full.pop(k, None)
    return subprocess.run([str(Path(sys.executable).parent / "supervise"), "node", *args],
                          capture_output=True, text=True, env=full, timeout=120)


def start_node(args: list[str], trainer_args: list[str], *, env: dict | None = None, log: Path | None = None):
    """`supervise node ARGS -- TRAINER_ARGS` in its own process group (like SkyPilot's run)."""
    tag = uuid.uuid4().hex
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", TAG: tag, **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "supervise"), "node", *args, "--", *trainer_args],
        env=full_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    proc.tag = tag
    return proc


def survivors(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def vanish(proc) -> None:
    """Like a VM going away: SIGKILL the wrapper and everything it started, at once."""
    procs = survivors(proc.tag)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    proc.wait(30)
    psutil.wait_procs(procs, timeout=30)


def cleanup(proc) -> None:
    """Never leave anything running, whatever the test did."""
    if proc.poll() is None:
        vanish(proc)
    for p in survivors(proc.tag):
        p.kill()
