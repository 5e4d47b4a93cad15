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


def _ev(kind, step, duration_s, writer="node0-rank0", incarnation="i1"):
    import time

    from supervisor.ledger.events import Event

    return Event(kind=kind, t=time.time(), time="", writer=writer, incarnation=incarnation,
                 fields={"step": step, "duration_s": duration_s})


def test_a_save_without_deadline_is_awaited_as_long_as_the_measured_save_needs():
    from supervisor.node.notices import SAVE_WAIT_FACTOR, SAVE_WAIT_SLACK_S, SaveWait, measured_save_s, save_wait_s

    saves = [_ev("checkpoint_saved", 5, 40.0), _ev("checkpoint_committed", 5, 2.0),
             _ev("checkpoint_saved", 10, 500.0), _ev("checkpoint_committed", 10, 100.0),  # a throttled store
             _ev("checkpoint_saved", 10, 7.0, incarnation="i0")]  # another start's save of the same step
    assert measured_save_s([]) is None
    assert measured_save_s(saves) == 600.0  # save + commit of one step, the longest one
    # measured: the factor over it, never under the floor -- and not a fixed 900 s either way
    assert save_wait_s(300, 600.0, 1800) == SAVE_WAIT_FACTOR * 600 + SAVE_WAIT_SLACK_S > 900
    assert save_wait_s(300, 1.0, 1800) == 300
    assert save_wait_s(300, None, 1800) == 1800  # nothing measured: as long as a silent trainer may be
    wait = SaveWait(floor_s=300, unmeasured_s=1800, now=1000.0)
    assert wait.give_up_at == 1000 + 1800
    assert not wait.observe(saves[:2], now=1001.0)  # what the ledger held at the notice is no progress
    assert wait.give_up_at == 1000 + 300  # 3 x 42 + 60 < the floor
    assert wait.observe(saves[:3], now=1200.0)  # the stop's save finished: its commit gets the whole wait again
    assert wait.give_up_at == 1200 + SAVE_WAIT_FACTOR * 500 + SAVE_WAIT_SLACK_S
    assert not wait.observe(saves[:3], now=1300.0) and wait.give_up_at == 1200 + 1560
    assert "measured save + commit 500.0 s" in wait.describe()
    # an async save blocks the loop briefly; its upload is what a stop waits for
    upload = [_ev("checkpoint_saved", 15, 3.0), _ev("checkpoint_uploaded", 15, 900.0), _ev("checkpoint_committed", 15, 1.0)]
    assert measured_save_s(upload) == 901.0
    assert wait.observe(saves[:3] + upload[:2], now=1400.0)  # the upload landing is progress too


def test_a_stop_exit_says_what_was_saved_and_why_not():
    from supervisor.node.wrapper import saved_step

    stop = Notice("stop", 0.0, None)
    assert exit_decision({"outcome": "preempted_saved", "step": 7}, 0, stop, None) == (
        ExitCode.FINISHED, "stopped on request; state saved and committed at step 7")
    unsaved = {"outcome": "preempted_unsaved", "step": 5, "reason": "saved step 8 but could not commit it"}
    assert exit_decision(unsaved, 0, stop, None) == (
        ExitCode.FINISHED, "stopped on request; not saved: saved step 8 but could not commit it")
    gave_up = "the trainer did not finish saving in time (measured save + commit 3.0 s: waiting up to 300 s)"
    assert exit_decision(None, None, stop, gave_up) == (ExitCode.FINISHED, f"stopped on request; not saved: {gave_up}")
    # a preemption the wrapper gave up on still recovers, with the reason
    assert exit_decision(None, None, Notice("sigterm", 0.0, None), gave_up) == (ExitCode.RETRYABLE, gave_up)
    assert saved_step({"outcome": "preempted_saved", "step": 7}) == 7
    assert saved_step(unsaved) is None and saved_step(None) is None
