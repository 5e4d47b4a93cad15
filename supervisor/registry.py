"""Where a job's name leads: which backend runs it and where its checkpoints are.

Launchers record each job they start; `status`, `logs`, `stop` and `report`
look names up here, from any terminal. One small JSON file per job under
`$SUPERVISE_HOME/jobs/` (default `~/.supervise/jobs/`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from supervisor.contract.runtime import read_json, write_json_atomic


def home() -> Path:
    return Path(os.environ.get("SUPERVISE_HOME", Path.home() / ".supervise"))


def _job_file(name: str) -> Path:
    return home() / "jobs" / f"{name}.json"


def record(name: str, *, backend: str, checkpoints_url: str, **extra: Any) -> None:
    write_json_atomic(_job_file(name), {"name": name, "backend": backend, "checkpoints_url": checkpoints_url, **extra})


def lookup(name: str) -> dict[str, Any] | None:
    return read_json(_job_file(name))


def all_jobs() -> list[dict[str, Any]]:
    folder = home() / "jobs"
    jobs = (read_json(p) for p in sorted(folder.glob("*.json"))) if folder.is_dir() else ()
    return [j for j in jobs if j]
