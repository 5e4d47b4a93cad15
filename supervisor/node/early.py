"""torchrun started at the very start of `supervise node`, before the CLI's own
imports (typer, rich, the wrapper's modules: ~0.1 s). On a restart the ranks
can start only once torchrun has imported torch; this moves that import to the
first thing the node does (issue 12: wrapper overhead of start -> first step).
The wrapper takes it (`take`), which starts one now if none was."""

from __future__ import annotations

import os
import subprocess
import sys

from supervisor.node.prctl import become_subreaper, die_with_parent

# The standard library and prctl only, until torchrun is started: psutil, logging
# and supervisor.node.torchrun's imports cost 60 ms here, all of it a restart's.
PRESTARTED_TORCHRUN = "supervisor.node.prestarted"  # `python -m` it

_early: subprocess.Popen | None = None


def prestart(args: list[str]) -> None:
    """`args`: what follows `supervise node`. Nothing starts for --dry-run or --help."""
    global _early
    own = args[: args.index("--")] if "--" in args else args
    if {"--dry-run", "--help", "-h"} & set(own):
        return
    _early = _start()


def _start() -> subprocess.Popen:
    """torchrun in a new session (a signal to our group does not reach it; we decide),
    waiting for its command on stdin."""
    become_subreaper()  # before the fork: an orphaned rank stays ours to kill
    return subprocess.Popen([sys.executable, "-m", PRESTARTED_TORCHRUN], env=dict(os.environ),
                            stdin=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent)


def take() -> subprocess.Popen:
    """The prestarted torchrun, once, or one started now (it waits for its command on stdin)."""
    global _early
    early, _early = _early, None
    return early if early is not None else _start()
