"""torchrun started at the very start of `supervise node`, before the CLI's own
imports (typer, rich, the wrapper's modules: ~0.1 s). On a restart the ranks
can start only once torchrun has imported torch; this moves that import to the
first thing the node does (issue 12: wrapper overhead of start -> first step).
The wrapper takes it (`take`), which starts one now if none was."""

from __future__ import annotations

import os
import subprocess

_early: subprocess.Popen | None = None


def prestart(args: list[str]) -> None:
    """`args`: what follows `supervise node`. Nothing starts for --dry-run or --help."""
    global _early
    own = args[: args.index("--")] if "--" in args else args
    if {"--dry-run", "--help", "-h"} & set(own):
        return
    _early = _start()


def _start() -> subprocess.Popen:
    from supervisor.node import process
    from supervisor.node.torchrun import prestart_argv

    process.become_subreaper()  # before the fork: an orphaned rank stays ours to kill
    return process.start(prestart_argv(), dict(os.environ), stdin=subprocess.PIPE)


def take() -> subprocess.Popen:
    """The prestarted torchrun, once, or one started now (it waits for its command on stdin)."""
    global _early
    early, _early = _early, None
    return early if early is not None else _start()
