"""Watchdog and exit-code decisions: pure functions of what the wrapper observed."""

from supervisor.exitcodes import ExitCode
from supervisor.node.notices import Notice
from supervisor.node.watchdog import Watchdog
from supervisor.node.wrapper import exit_decision


def test_watchdog_startup_grace_then_progress_deadline():
    dog = Watchdog(hang_timeout_s=10, startup_timeout_s=100, now=0)
    assert dog.observe({}, 50) is None
    assert "heartbeat" in Watchdog(hang_timeout_s=10, startup_timeout_s=100, now=0).observe({}, 101)
    assert dog.observe({0: 1, 1: 1}, 60) is None
    assert dog.observe({0: 2, 1: 1}, 69) is None  # one rank advancing is progress
    assert dog.observe({0: 2, 1: 1}, 78) is None
    reason = dog.observe({0: 2, 1: 1}, 80)
    assert "no rank advanced for 10 s" in reason and "rank 0 at step 2" in reason


def test_exit_codes():
    notice = Notice("sigterm", 0.0, None)
    assert exit_decision({"outcome": "finished", "step": 9}, 0, None, None)[0] == ExitCode.FINISHED
    assert exit_decision({"outcome": "preempted_saved", "step": 5}, 1, notice, None)[0] == ExitCode.PREEMPTED_SAVED
    assert exit_decision({"outcome": "preempted_unsaved", "step": 5}, 1, notice, None)[0] == ExitCode.RETRYABLE
    assert exit_decision(None, None, notice, None)[0] == ExitCode.RETRYABLE
    assert exit_decision(None, 0, notice, None)[0] == ExitCode.RETRYABLE  # no outcome: no promise of a save
    assert exit_decision(None, None, None, "hang: ...")[0] == ExitCode.RETRYABLE
    assert exit_decision(None, 1, None, None)[0] == ExitCode.RETRYABLE
    assert exit_decision(None, 0, None, None)[0] == ExitCode.FINISHED
