"""The background committer's rules, with plain functions for commits (no torch, no processes)."""

import threading

from supervisor.titan.committer import Committer
from supervisor.titan.policy import EXIT_SLACK_S, commit_budget_s


def test_commits_run_in_order_off_the_caller_and_wait_is_bounded():
    gate, seen = threading.Event(), []

    def commit(step):
        gate.wait()
        seen.append(step)
        return True, "committed"

    c = Committer(commit)
    c.submit(4)
    c.submit(8)  # returns at once although the first commit is blocked
    assert c.pending() and not c.wait(0.05) and seen == []
    gate.set()
    assert c.wait(5) and seen == [4, 8] and not c.pending()
    assert c.committed(4) and c.committed(8) and not c.committed(12)


def test_two_consecutive_failures_stop_and_a_success_resets():
    outcomes = iter([(False, "denied"), (True, "committed"), (False, "denied"), (False, "store gone")])
    results = []
    c = Committer(lambda step: next(outcomes), results.append)
    for step in (1, 2, 3):
        c.submit(step)
    c.wait(5)
    assert c.should_stop() is None  # 1 failed, 2 ok, 3 failed: one in a row
    c.submit(4)
    c.wait(5)
    reason = c.should_stop()
    assert reason.startswith("2 consecutive checkpoint commits failed") and "step 3: denied" in reason
    assert "step 4: store gone" in reason and [r.step for r in results] == [1, 2, 3, 4]


def test_an_exception_is_a_failed_commit_not_a_dead_thread():
    def commit(step):
        if step == 1:
            raise OSError("boom")
        return True, "committed"

    c = Committer(commit)
    c.submit(1)
    c.submit(2)
    assert c.wait(5)
    assert not c.committed(1) and "OSError: boom" in c.results[1].reason and c.committed(2)


def test_commit_budget_follows_the_deadline():
    assert commit_budget_s(100.0, 130.0, 600.0) == 30.0 - EXIT_SLACK_S
    assert commit_budget_s(100.0, 101.0, 600.0) == 0.0
    assert commit_budget_s(100.0, None, 10.0) > 10.0
    # no deadline (the end of training, a stop): the bound grows with this run's measured commits
    assert commit_budget_s(100.0, None, 60.0, 300.0) >= 900.0
    assert commit_budget_s(100.0, None, 60.0, 300.0) > commit_budget_s(100.0, None, 60.0, 1.0)


def test_the_collective_timeout_during_a_save_covers_a_slow_one():
    from supervisor.titan.policy import save_comm_timeout_s

    assert save_comm_timeout_s(None, 300, 100) == 300  # TorchTitan's start-up timeout
    assert save_comm_timeout_s(250.0, 300, 100) == 750  # a save measured at 250 s: 3x
