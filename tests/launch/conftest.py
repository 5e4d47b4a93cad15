"""Fixtures for the local backend tests."""

import pytest

from supervisor.launch.base import is_terminal
from supervisor.launch.local import LocalBackend
from supervisor.launch.procs import tagged


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """A LocalBackend with its own SUPERVISE_HOME; afterwards, no job's process survives."""
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lau = LocalBackend()
    yield lau
    for st in lau.status():
        if not is_terminal(st.state):
            lau.cancel(st.name, graceful=False)
        assert not tagged(f"{st.name}/"), "processes left behind"
