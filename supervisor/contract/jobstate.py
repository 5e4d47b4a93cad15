"""The job-state vocabulary every backend and the ledger share: SkyPilot's
`ManagedJobStatus` names (sky/jobs/state.py), which the local emulator uses as
they are. Imports nothing, so any module may depend on it."""

from __future__ import annotations

PENDING, STARTING, RUNNING, RECOVERING = "PENDING", "STARTING", "RUNNING", "RECOVERING"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
FAILED_SETUP = "FAILED_SETUP"  # the task's setup exited non-zero
# ManagedJobStatus.terminal_statuses(): FAILED stands for every FAILED_* variant
# (FAILED_SETUP, FAILED_PRECHECKS, FAILED_NO_RESOURCE, FAILED_CONTROLLER).
_TERMINAL_PREFIXES = (SUCCEEDED, FAILED, CANCELLED)


def is_terminal(state: str | None) -> bool:
    """A job in this state will not run again (CANCELLING is not there yet)."""
    return bool(state) and str(state).startswith(_TERMINAL_PREFIXES)
