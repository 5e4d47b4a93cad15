"""What every backend shares (torchx-style: the NodeTask says *what* runs, a
backend says *where*): the status row and the Backend protocol (the state
vocabulary lives in `supervisor.contract.jobstate`). `submit = schedule(dryrun(task))`, as torchx's
`Scheduler.submit = schedule(submit_dryrun(app))`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from supervisor.errors import SuperviseError
from supervisor.contract.jobstate import (  # noqa: F401  (re-exported: the backends' vocabulary)
    CANCELLED, FAILED, FAILED_SETUP, PENDING, RECOVERING, RUNNING, STARTING, SUCCEEDED, is_terminal,
)


class AlreadyFinished(SuperviseError):
    """`stop` of a job that already ended: nothing to do, not a failure."""

    exit_code = 0


@dataclass
class JobStatus:
    name: str
    backend: str  # "skypilot" | "local"
    state: str  # one of the states above (SkyPilot may report other FAILED_* variants)
    recoveries: int = 0
    job_id: str | None = None
    reason: str | None = None  # why it failed or was cancelled
    checkpoints_url: str | None = None
    details: str | None = None  # SkyPilot's `details`: why a job waits (STARTING without quota...), recovers or failed


def shown_reason(reason: str | None, details: str | None, restarts: dict | None) -> str:
    """`status`'s REASON: the backend's reason, else its details (why a job is not
    running), then what the nodes recorded in the bucket (budget.streak_view): their
    verdict (78) or the streak's last error, which names the trainer's own error line,
    unless the backend's text already carries it (the local backend quotes the node)."""
    own = reason or details or ""
    node = (restarts or {}).get("gave_up") or (restarts or {}).get("last_error")
    if node and node not in own:
        return f"{own}; node: {node}" if own else node
    return own


class Request(Protocol):
    """What a backend would submit; `render()` is what `start --dry-run` prints."""

    name: str
    missing_secrets: list[str]  # secret names the launching shell lacks (a launch refuses them)

    def render(self) -> str: ...


class Backend(Protocol):
    name: str

    def adapt(self, spec: Any) -> Any:
        """The JobSpec as this backend can run it (e.g. no bucket mounts on the local one)."""

    def dryrun(self, task: Any, **options: Any) -> Request:
        """The backend's request for a NodeTask, built once; nothing is started."""

    def schedule(self, request: Request) -> str:
        """Submit `request`; returns the backend's job id."""

    def status(self, name: str | None = None) -> list[JobStatus]:
        """All jobs of this backend, or the one called `name`."""

    def logs(self, name: str, *, follow: bool = False) -> None:
        """Stream the job's output to stdout."""

    def cancel(self, name: str, *, graceful: bool = True) -> None:
        """Stop the job; graceful lets the node wrapper save and commit first."""
