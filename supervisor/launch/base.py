"""The Launcher interface shared by the SkyPilot and local backends (torchx-style:
the spec says *what* runs, a launcher says *where*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class JobStatus:
    name: str
    backend: str  # "skypilot" | "local"
    state: str  # PENDING, STARTING, RUNNING, RECOVERING, SUCCEEDED, FAILED, CANCELLED
    recoveries: int = 0
    job_id: str | None = None
    reason: str | None = None  # why it failed or was cancelled
    checkpoints_url: str | None = None


class Launcher(Protocol):
    backend: str

    def launch(self, spec, *, name: str) -> str:
        """Start the job described by a JobSpec; returns the backend's job id."""

    def status(self, name: str | None = None) -> list[JobStatus]:
        """All jobs of this backend, or the one called `name`."""

    def logs(self, name: str, *, follow: bool = False) -> None:
        """Stream the job's output to stdout."""

    def cancel(self, name: str, *, graceful: bool = True) -> None:
        """Stop the job; graceful lets the node wrapper save and commit first."""
