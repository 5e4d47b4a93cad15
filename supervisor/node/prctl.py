"""The two Linux prctl settings that keep torchrun's processes ours: standard
library only, since `supervise node` sets them before anything else is imported
(supervisor.node.early)."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

# Resolved once, before any fork: the child between fork and exec must not dlopen.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _prctl(option: int, value: int) -> None:
    if _LIBC is not None:
        _LIBC.prctl(option, value, 0, 0, 0)


def become_subreaper() -> None:
    """Orphaned descendants (torchrun's workers, each in a session of its own) are
    re-parented to this process, so they stay findable and killable."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to this child when the wrapper dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
