"""Typed exit codes of `supervise node`: the one place they are defined.

A SkyPilot managed job recovers on the codes in `RECOVER_ON` (put into
`job_recovery.recover_on_exit_codes`) and never on `USER_ERROR`, so a broken
config does not burn money in a restart loop. Values follow sysexits(3) where
one fits.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    FINISHED = 0  # training reached its last step
    RETRYABLE = 69  # EX_UNAVAILABLE: NCCL/gloo error, store unreachable, hang
    PREEMPTED_SAVED = 75  # EX_TEMPFAIL: notice received, state saved and committed
    USER_ERROR = 78  # EX_CONFIG: bad arguments or config; retrying cannot help


RECOVER_ON: tuple[int, ...] = (ExitCode.PREEMPTED_SAVED, ExitCode.RETRYABLE)
