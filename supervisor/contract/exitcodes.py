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


def process_exit(code: int, node_rank: int, num_nodes: int) -> int:
    """What a node's process exits with: a recoverable end of a multi-node job is the head's to report.

    SkyPilot runs all nodes of a Slurm job as one `srun --kill-on-bad-exit` step
    (sky/backends/task_codegen.py, SlurmCodeGen.add_task): the first non-zero exit gets
    the other nodes SIGTERMed and srun reports 143 for the step, which recovers nothing
    (seen here: 75 then a terminated peer -> 143; the peers' 0 first, then 75 -> 75).
    So the other nodes exit 0 and the head, last, exits the code. On a cloud SkyPilot
    keeps every node's code and recovers when any of them is in recover_on_exit_codes
    (sky/jobs/controller.py, should_restart_on_failure), so [75, 0] recovers there too.
    """
    return ExitCode.FINISHED if num_nodes > 1 and node_rank > 0 and code in RECOVER_ON else code
