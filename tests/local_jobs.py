"""Clean-up for tests that run `supervise demo`/`drill` in a subprocess: a run
killed by its timeout could not stop its local jobs, so the test does."""

from __future__ import annotations

from pathlib import Path


def stop_local_jobs(monkeypatch, home: Path) -> None:
    """Hard-cancel every unfinished local job under SUPERVISE_HOME=`home`."""
    from supervisor.contract.jobstate import is_terminal
    from supervisor.launch.local import LocalBackend

    monkeypatch.setenv("SUPERVISE_HOME", str(home))
    backend = LocalBackend()
    for st in backend.status():
        if not is_terminal(st.state):
            backend.cancel(st.name, graceful=False)
