"""The one retry policy for every object-store call.

s3fs and botocore each retry on their own; the catalog turns both off (see
`fs.Store`) so that this policy is the only one: exponential backoff with
jitter on throttling, 5xx, timeouts and connection resets, never on auth or
validation errors, bounded in total time.

How long it persists is the caller's: PATIENT (nodes, writers: a blip must not
cost a recovery; every attempt logged) or BRIEF (someone at a terminal:
`status`, `report`, `checkpoints list|latest|verify`, `start`'s preflight: an
unreachable store is answered in seconds, with one line, attempts logged at
debug level only).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass

import tenacity

log = logging.getLogger("supervisor.store")

_TRANSIENT_ERRNO = {
    errno.EBUSY,  # s3fs: 503 SlowDown / ServiceUnavailable, 409
    errno.EREMOTEIO,  # s3fs: 500 InternalError
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
}
_TRANSIENT_WORDS = ("slowdown", "throttl", "reduce your request rate", "requesttimeout", "internalerror",
                    "service unavailable", "serviceunavailable", "bad gateway", "gateway timeout")  # fmt: skip


def is_transient(err: BaseException) -> bool:
    """True for errors that a later attempt can fix; False for auth/validation/not-found."""
    if isinstance(err, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    name = type(err).__name__
    module = type(err).__module__ or ""
    if module.startswith(("botocore", "aiohttp", "aiobotocore", "urllib3", "http.client")) and name not in (
        "ClientError", "NoCredentialsError", "PartialCredentialsError", "ParamValidationError",
    ):  # fmt: skip
        # connection closed/refused, read/connect timeouts, payload errors, parser errors
        return True
    if name in ("FSTimeoutError", "IncompleteRead"):
        return True
    if isinstance(err, OSError):
        if err.errno in _TRANSIENT_ERRNO:
            return True
        text = str(err).lower()
        return err.errno in (errno.EIO, None) and any(w in text for w in _TRANSIENT_WORDS)
    return False


def _log_attempt(level: int):
    def log_attempt(state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        log.log(
            level, "store call %s failed (attempt %d, %.1fs so far): %s: %s; retrying",
            getattr(state.fn, "__name__", "?"), state.attempt_number, state.seconds_since_start,
            type(err).__name__, err,
        )  # fmt: skip

    return log_attempt


@dataclass(frozen=True)
class Policy:
    """How long one call may keep retrying (env `env`, else `default_s`), how loudly, and
    the longest pause between attempts."""

    env: str
    default_s: float
    quiet: bool = False
    max_wait_s: float = 5.0

    def deadline_s(self) -> float:
        return float(os.environ.get(self.env, self.default_s))

    def call(self, fn, *args, **kwargs):
        """Run one store call under the policy; the last error is re-raised as is."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=self.max_wait_s, jitter=min(0.5, self.max_wait_s / 5)),
            stop=tenacity.stop_after_delay(self.deadline_s()),
            before_sleep=_log_attempt(logging.DEBUG if self.quiet else logging.WARNING),
            reraise=True,
        )
        return retrying(fn, *args, **kwargs)


PATIENT = Policy("SUPERVISE_STORE_RETRY_S", 60.0)
BRIEF = Policy("SUPERVISE_STORE_READ_RETRY_S", 5.0, quiet=True)
# the ledger's writes sit on the training path: a short retry while the store is healthy, then one try
LEDGER_WRITE = Policy("SUPERVISE_LEDGER_WRITE_RETRY_S", 2.0, quiet=True, max_wait_s=0.5)
ONCE = Policy("SUPERVISE_STORE_ONCE_S", 0.0, quiet=True)
