"""Catalog errors: each is one line a user can act on (SuperviseError)."""

from supervisor.errors import SuperviseError


class StoreInputError(SuperviseError):
    """Bad URL, missing bucket, wrong credentials, a URL that is a file (exit 2)."""

    exit_code = 2


class StoreUnreachable(SuperviseError):
    """The store kept failing with transient errors past the retry deadline (exit 2)."""

    exit_code = 2


class CheckpointInvalid(SuperviseError):
    """Nothing valid / verification failed (exit 1)."""

    exit_code = 1


class IncompleteCheckpoint(CheckpointInvalid):
    """commit() refused: `.metadata` missing or a file it names is missing or short."""


class AlreadyCommitted(CheckpointInvalid):
    """Another writer (or an earlier call) already committed this step."""
