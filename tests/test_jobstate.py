"""The state vocabulary is SkyPilot's: `is_terminal` agrees with the installed
`ManagedJobStatus.is_terminal()` on every state SkyPilot has."""

import pytest

from supervisor.contract import jobstate

state = pytest.importorskip("sky.jobs.state")


@pytest.mark.parametrize("status", list(state.ManagedJobStatus), ids=lambda s: s.value)
def test_is_terminal_matches_skypilot(status):
    assert jobstate.is_terminal(status.value) == status.is_terminal()


def test_our_names_are_skypilots():
    names = {s.value for s in state.ManagedJobStatus}
    ours = {jobstate.PENDING, jobstate.STARTING, jobstate.RUNNING, jobstate.RECOVERING,
            jobstate.SUCCEEDED, jobstate.FAILED, jobstate.CANCELLED, jobstate.FAILED_SETUP}
    assert ours <= names
    assert not jobstate.is_terminal(None) and not jobstate.is_terminal("")
